"""Stage 3: PPO of the actor against a reward source, with a critic, a frozen reference, a KL penalty,
an EMA of the actor and optional pretraining-loss mixing (InstructGPT; DeepSpeed-Chat step 3)."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy

from rlhf_lit import losses, ppo
from rlhf_lit.estimators import GAE, AdvantageEstimator
from rlhf_lit.generation import GenerationConfig
from rlhf_lit.kl_control import FixedKL, KLController
from rlhf_lit.models import (
    LoRA,
    ModelSpec,
    apply_lora,
    enable_checkpointing,
    gathered,
    has_dropout,
    lm_inputs,
    merged,
    next_token_logprobs,
    set_dropout,
)
from rlhf_lit.ops import masked_mean
from rlhf_lit.optim import LRSchedule, clip_grad_norms, param_groups
from rlhf_lit.rewards import RewardSource, score
from rlhf_lit.rollout import (
    ActorCritic,
    InformativeBuffer,
    PPOConfig,
    Rollout,
    make_rollout,
    penalised_scores,
    rollout_metrics,
)
from rlhf_lit.stage import StageModule


class PPOModule(StageModule):
    """Manual optimization: each training step makes one rollout batch and runs the PPO epochs on it."""

    stage = "ppo"
    measure_throughput = False  # log_step reports prompts/s and tokens/s of each phase (time/*)

    def __init__(
        self,
        actor: ModelSpec,
        reward: RewardSource,
        critic: Optional[ModelSpec] = None,
        reference: Optional[ModelSpec] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: Optional[LRSchedule] = None,
        weight_decay: float = 0.0,
        kl: Optional[KLController] = None,
        advantage: Optional[AdvantageEstimator] = None,
        generation: Optional[GenerationConfig] = None,
        algo: Optional[PPOConfig] = None,
        lora: Optional[LoRA] = None,
        monitor: Optional[RewardSource] = None,
        value_head_on_actor: bool = False,
        samples_every: int = 10,
        dropout: Optional[float] = 0.0,
        frozen_dtype: str = "bfloat16",
        critic_lora: Optional[LoRA] = None,
    ) -> None:
        """
        Args:
            actor: spec of the policy (usually the SFT export).
            reward: reward source: the reward model, a Python function, or a weighted sum.
            critic: spec of the value model (usually the reward export); required by critic-based estimators.
            reference: spec of the frozen reference (default: the actor's spec; with LoRA, the actor with
                adapters disabled).
            optimizer: optimizer class and arguments; its lr is the actor's (the critic's is algo.critic_lr).
            schedule: warmup + decay of both learning rates.
            weight_decay: decoupled weight decay of the weight matrices.
            kl: KL coefficient controller (default: fixed beta 0.05). A fixed 0 means no KL anywhere: the
                reference model is then not built.
            advantage: advantage estimator: GAE (default), GRPO, DrGRPO, RLOO or REINFORCEPP.
            generation: rollout sampling settings.
            algo: the PPO update's knobs.
            lora: train low-rank adapters on the actor.
            monitor: a reward source scored on every rollout and logged as objective/monitor_scores but never
                trained on (e.g. the gold reward, to watch over-optimisation of the proxy).
            value_head_on_actor: take values from a linear head on the actor's last hidden state instead
                of a separate critic network.
            samples_every: keep prompt/response/score samples for the sample table every n steps.
            dropout: every dropout probability of the actor and critic during PPO. 0 (default) turns dropout
                off, as DeepSpeed-Chat's OPT recipes and OpenRLHF do in RL: the PPO ratio then compares the same
                function before and after the update. None keeps the checkpoints' dropout (experience is still
                scored in eval mode; the fused first forward is then not used).
            frozen_dtype: storage dtype of the frozen reference, reward and monitor models: bfloat16 (default,
                half of fp32's memory; computed in fp32 layer by layer where the hardware has no bf16 units),
                float16 or float32 (as loaded). The EMA stays fp32: bf16 would round away its (1 - beta) updates.
            critic_lora: train low-rank adapters on the critic's backbone (its value head in full) instead of all
                its weights: no gradients or Adam states for the backbone (merged on export).
        """
        super().__init__(optimizer, schedule, weight_decay, frozen_dtype)
        self.save_hyperparameters(ignore=["reward", "monitor"])
        self.automatic_optimization = False
        self.refuse_reference_with_lora(lora, reference, "actor")
        self.actor_spec, self.critic_spec, self.ref_spec = actor, critic, reference or actor
        self.reward, self.lora, self.critic_lora, self.monitor = reward, lora, critic_lora, monitor
        self.kl = kl or FixedKL(0.05)
        self.advantage = advantage or GAE()
        self.gen, self.algo = generation or GenerationConfig(), algo or PPOConfig()
        if self.gen.engine == "vllm":
            from rlhf_lit.vllm_engine import require_vllm

            require_vllm()  # a one-line error naming the install command, before any model or data is loaded
        if self.advantage.needs_critic and critic is None and not value_head_on_actor:
            raise ValueError(
                f"{type(self.advantage).__name__} needs a critic: set model.critic (e.g. the reward "
                "export) or value_head_on_actor: true"
            )
        if self.algo.dynamic_sampling and self.advantage.samples_per_prompt < 2:
            raise ValueError("algo.dynamic_sampling needs a group estimator (samples_per_prompt >= 2), e.g. GRPO")
        self.value_head_on_actor = value_head_on_actor and self.advantage.needs_critic
        self.samples_every, self.dropout = samples_every, dropout
        self.ac = self.ref = self.ema = None
        self.dropout_active = False
        self.samples: list[dict] = []
        self.buffer: Optional[InformativeBuffer] = None  # dynamic sampling: informative groups waiting
        self.timing: dict[str, float] = {}  # the last step's generate / score / train seconds
        self.engine = None  # generation.engine vllm: the colocated engine, built at the first rollout

    def configure_model(self) -> None:
        if self.ac is not None:
            return
        policy = self.actor_spec.build_causal_lm(self.tokenizer)
        if self.actor_spec.gradient_checkpointing:
            enable_checkpointing(policy)
        policy = apply_lora(policy, self.lora)
        critic = head = None
        if self.value_head_on_actor:
            head = torch.nn.Linear(policy.get_input_embeddings().embedding_dim, 1, bias=False)
        elif self.advantage.needs_critic:
            critic = self.critic_spec.build_scalar(self.tokenizer)
            if self.critic_spec.gradient_checkpointing:
                enable_checkpointing(critic.backbone)
            critic.backbone = apply_lora(critic.backbone, self.critic_lora, task_type=None)
        self.ac = ActorCritic(policy, critic, head)
        if self.dropout is not None:
            set_dropout(self.ac, self.dropout)
        self.dropout_active = has_dropout(self.ac)  # then a train-mode forward is not the scoring pass
        if self.lora is None and self.uses_reference:
            self.ref = self.ref_spec.build_causal_lm(self.tokenizer).eval().requires_grad_(False)
        for source in [s for s in (self.reward, self.monitor) if s is not None]:
            source.build(self.tokenizer)
            source.eval().requires_grad_(False)
        self.hold_frozen(self.ref, self.reward, self.monitor, dtype=self.frozen_dtype)
        if self.algo.ema_beta is not None:  # built like the actor (partitioned under ZeRO-3), then copied
            self.ema = (
                apply_lora(self.actor_spec.build_causal_lm(self.tokenizer), self.lora).eval().requires_grad_(False)
            )
            self.update_ema(beta=0.0)
        # Actor and critic train, frozen models stay in eval (from_pretrained returns eval mode and
        # Lightning does not switch it; #13). Lightning warns about every eval-mode module at fit start:
        # here the eval-mode ones are exactly the frozen ones, on purpose.
        self.train()
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    @property
    def uses_reference(self) -> bool:
        """False when the KL coefficient is a fixed 0: no penalty, no loss term, no reference model."""
        return not (type(self.kl) is FixedKL and self.kl.value == 0)

    def trainable_groups(self):
        groups = param_groups(self.ac.policy, self.weight_decay)
        if self.ac.has_values:
            groups += param_groups(self.ac.critic or self.ac.value_head, self.weight_decay, lr=self.algo.critic_lr)
        return groups

    def optimizer_steps(self) -> int:
        # Under manual optimization Lightning counts each opt.step() as a global step, but estimates
        # the total from batches: with max_epochs, scale by the steps each rollout batch makes.
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches) * self.algo.ppo_epochs * self.algo.num_minibatches

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.ref, self.reward, self.monitor, self.ema):  # frozen models stay in eval mode (no dropout)
            if frozen is not None:
                frozen.eval()
        return self

    # -- the algorithm ------------------------------------------------------------------------
    def rollout(self, batch, score_policy: bool = True) -> Rollout:
        ids, mask, prompts = batch["prompt_ids"], batch["prompt_mask"], batch["prompt"]
        columns, k = batch.get("columns") or {}, self.advantage.samples_per_prompt
        if k > 1:  # group estimators: k samples of every prompt, adjacent rows
            ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            prompts = [p for p in prompts for _ in range(k)]
            columns = {name: [v for v in col for _ in range(k)] for name, col in columns.items()}
        if self.gen.engine == "vllm" and self.engine is None:  # after any checkpoint restore: current weights
            from rlhf_lit.models import gathered
            from rlhf_lit.vllm_engine import VLLMEngine

            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31)) + self.global_rank
            with gathered(self.ac.policy.parameters()):
                self.engine = VLLMEngine.from_model(self.ac.policy, self.tokenizer, self.gen.vllm, seed=seed)
        return make_rollout(
            self.ac,
            self.ref,
            self.reward,
            self.tokenizer,
            ids,
            mask,
            prompts,
            self.gen,
            ref_from_adapters=self.lora is not None and self.uses_reference,
            score_policy=score_policy,
            columns=columns,
            engine=self.engine,
        )

    def informative(self, ro: Rollout) -> Optional[Rollout]:
        """DAPO's dynamic sampling: a full batch (as many rows as this rollout) of groups whose scores
        differ once enough are pending, else None. Every rank decides together."""
        self.buffer = self.buffer or InformativeBuffer(self.advantage.samples_per_prompt, self.tokenizer.pad_token_id)
        kept = self.buffer.add(ro)
        self.log("rollout/informative_fraction", kept, batch_size=ro.mask.size(0))
        short = torch.tensor(self.buffer.size() < ro.mask.size(0), device=ro.mask.device)
        return None if self.any_rank(short) else self.buffer.take(ro.mask.size(0))

    def rewards(self, ro: Rollout):
        """Clipped (eos- and overlong-penalised) scores plus the per-token KL penalty (none when the KL is
        in the loss). Returns (B, R), stats (no KL stats without a reference) and the (B,) scores."""
        a, scores = self.algo, penalised_scores(ro, self.algo, self.gen.max_new_tokens)
        ref = ro.ref_logprobs if ro.ref_logprobs is not None else ro.logprobs
        coef = 0.0 if a.kl_in_loss else self.kl.value
        rewards, stats = ppo.shaped_rewards(scores, ro.logprobs, ref, ro.mask, coef, a.kl_estimator)
        if ro.ref_logprobs is None:
            stats = {"rlhf_reward": stats["rlhf_reward"]}
        if self.algo.whiten_rewards:
            rewards = ppo.whiten(rewards, ro.mask, shift_mean=False, sum_fn=self.sum_over_ranks)
        return rewards, stats, scores

    def advantages(self, rewards, values, mask, scores=None):
        """The estimator's advantages and returns (B, R); GAE's whitened over the batch's tokens."""
        takes = "scores" in inspect.signature(self.advantage.__call__).parameters  # estimators written before it
        adv, ret = self.advantage(rewards, values, mask, **({"scores": scores} if takes else {}))
        if self.algo.whiten_advantages and self.advantage.token_whitening:
            adv = ppo.whiten(adv, mask, sum_fn=self.sum_over_ranks)
        return adv, ret

    def minibatch_loss(self, ro: Rollout, idx, adv, ret, ptx, out=None, tis=None):
        """``out``: the whole batch's (logprobs, entropy, values) forward, when already computed (fused);
        ``tis``: (B, R) truncated importance sampling weights (engine-sampled rollouts)."""
        a, norm = self.algo, float(self.gen.max_new_tokens)
        mask = ro.mask[idx]
        if a.overlong_filter:  # truncated responses carry no signal about where to stop (DAPO)
            mask = mask * ro.ended[idx].unsqueeze(-1).float()
        if out is None:
            out = self.ac(ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, self.gen.temperature)
        else:
            out = tuple(t[idx] if t is not None else None for t in out)
        logprobs, entropy, values = out
        loss, stats = ppo.policy_loss(
            logprobs,
            ro.logprobs[idx],
            adv[idx],
            mask,
            a.clip_eps,
            a.clip_eps_high,
            a.loss_agg,
            norm,
            weights=None if tis is None else tis[idx],
        )
        if a.kl_in_loss and ro.ref_logprobs is not None:
            kl, kl_stats = ppo.kl_loss(logprobs, ro.ref_logprobs[idx], mask, a.kl_estimator, a.loss_agg, norm)
            loss, stats = loss + self.kl.value * kl, {**stats, **kl_stats}
        stats["ratio_max"] = torch.exp((logprobs - ro.logprobs[idx]) * mask).max().detach()
        if values is not None:
            vf, vf_stats = ppo.value_loss(values, ro.values[idx], ret[idx], mask, a.value_clip)
            loss, stats = loss + a.vf_coef * vf, {**stats, **vf_stats}
        if a.entropy_coef:
            loss = loss - a.entropy_coef * masked_mean(entropy, mask)
        if ptx is not None and a.ptx_coef:
            lp = next_token_logprobs(
                self.ac.policy, **lm_inputs(self.ac.policy, ptx["input_ids"], ptx["attention_mask"])
            )
            ptx_loss, _ = losses.sft_loss(lp, ptx["loss_mask"])
            loss, stats["ptx_loss"] = loss + a.ptx_coef * ptx_loss, ptx_loss.detach()
        return loss, stats

    def training_step(self, batch, batch_idx):
        prompts, ptx = (batch["prompts"], batch["ptx"]) if "prompts" in batch else (batch, None)
        fused = self.algo.fused(self.dropout_active)
        ro = self.rollout(prompts, score_policy=not fused)
        if self.algo.dynamic_sampling and (ro := self.informative(ro)) is None:
            return  # not yet a full batch of informative groups: sample the next prompts first
        t0, out = time.perf_counter(), None
        if fused:  # the old log-probs/values are the training forward's, detached (one pass instead of two)
            out = self.ac(ro.input_ids, ro.attention_mask, ro.prompt_len, self.gen.temperature)
            ro.logprobs, ro.entropy = out[0].detach(), out[1].detach()
            ro.values = out[2].detach() if out[2] is not None else None
        rewards, kl_stats, scores = self.rewards(ro)
        adv, ret = self.advantages(rewards, ro.values, ro.mask, scores)
        tis, engine_stats = self.engine_mismatch(ro)

        opt, sched, n = self.optimizers(), self.lr_schedulers(), ro.mask.size(0)
        per_step, skipped = [], 0
        for _ in range(self.algo.ppo_epochs):
            order = torch.randperm(n, device=ro.mask.device)
            for idx in order.chunk(min(self.algo.num_minibatches, n)):
                loss, stats = self.minibatch_loss(ro, idx, adv, ret, ptx, out, tis)
                if self.diverged(loss, stats["ratio_max"]):
                    skipped += 1  # a diverged update: skip it rather than poison the weights
                    continue
                opt.zero_grad()
                self.manual_backward(loss)
                stats.update(self.clip_per_model())
                opt.step()
                sched.step()
                self.update_ema()
                per_step.append(stats)
        # Every rank must hold the same beta: the controller sees the KL averaged over ranks.
        if "kl" in kl_stats:
            self.kl.update(float(self.mean_over_ranks(kl_stats["kl"])), n * self.trainer.world_size)

        self.timing = {**ro.timing, "train_s": time.perf_counter() - t0}
        if self.engine is not None and per_step:  # the engine samples the next rollout with these weights
            self.timing["sync_s"] = self.engine.sync(self.ac.policy)
        if self.logging_step():
            self.log_step(ro, kl_stats, per_step, skipped, self.timing, engine_stats)
        if self.samples_every and batch_idx % self.samples_every == 0:
            self.samples = [
                {"prompt": p, "response": r, "score": float(s)} for p, r, s in zip(ro.prompts, ro.responses, ro.scores)
            ]

    def engine_mismatch(self, ro: Rollout):
        """Engine-sampled rollouts: the engine's log-probs against the trainer's (rollout/logprob_diff_*)
        and, with algo.tis_cap, the truncated importance sampling weights (B, R). Returns (weights or
        None, stats)."""
        if ro.engine_logprobs is None:
            return None, {}
        stats = ppo.logprob_mismatch(ro.logprobs, ro.engine_logprobs, ro.mask)
        if self.algo.tis_cap is None:
            return None, stats
        weights, tis_stats = ppo.tis_weights(ro.logprobs, ro.engine_logprobs, ro.mask, self.algo.tis_cap)
        return weights, {**stats, **tis_stats}

    def teardown(self, stage: str) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def clip_per_model(self) -> dict:
        """Actor and critic clipped each to its own norm (their norms before clipping are returned). Under
        DeepSpeed the engine owns the gradients and clips by its ``gradient_clipping``."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return {}
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16: gradients still scaled here
        critic = self.ac.critic or self.ac.value_head
        groups = {"actor": (self.ac.policy.parameters(), self.algo.actor_max_grad_norm)}
        if critic is not None:
            groups["critic"] = (critic.parameters(), self.algo.critic_max_grad_norm)
        return clip_grad_norms(groups, float(scaler.get_scale()) if scaler is not None else 1.0)

    def diverged(self, loss: torch.Tensor, ratio_max: torch.Tensor) -> bool:
        """A non-finite loss or an exploding policy ratio on any rank: every rank skips together (a step
        taken by some ranks only would leave the others waiting in the gradient all-reduce)."""
        return self.any_rank((~torch.isfinite(loss.detach())) | (ratio_max > (self.algo.max_ratio or float("inf"))))

    @torch.no_grad()
    def update_ema(self, beta: Optional[float] = None) -> None:
        """ema <- beta * ema + (1 - beta) * actor, after every optimizer step (DeepSpeed-Chat's beta 0.992)."""
        if self.ema is None:
            return
        beta = self.algo.ema_beta if beta is None else beta
        pairs = list(zip(self.ema.parameters(), self.ac.policy.parameters()))
        with gathered([p for pair in pairs for p in pair], modifier_rank=0):
            for e, p in pairs:
                e.lerp_(p.detach().to(e.dtype), 1.0 - beta)

    def log_step(self, ro: Rollout, kl_stats, per_step, skipped, timing, engine_stats) -> None:
        logs = {**rollout_metrics(ro, kl_stats, per_step, skipped, timing), "objective/kl_coef": self.kl.value}
        logs.update({f"rollout/{k}": v for k, v in engine_stats.items()})
        if getattr(self.reward, "truncated", None) is not None:  # rows the reward model's own tokenizer cut
            logs["reward/truncated_rows"] = float(self.reward.truncated)
        if self.monitor is not None:
            logs["objective/monitor_scores"] = score(
                self.monitor, ro.prompts, ro.responses, ro.input_ids, ro.attention_mask, ro.columns, ro.ended
            ).mean()
        self.log_dict(logs, prog_bar=False, batch_size=ro.mask.size(0))
        self.log("objective/scores_pb", ro.scores.mean(), prog_bar=True, logger=False)

    # -- resume and export ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl.state_dict()

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl.load_state_dict(checkpoint["kl_controller"])

    def export_models(self):
        save = lambda m: lambda out: merged(m).save_pretrained(out, safe_serialization=True)
        out = {"actor": save(self.ac.policy)}
        if self.ema is not None:
            out["actor_ema"] = save(self.ema)
        if self.ac.critic is not None:
            out["critic"] = lambda p: self.ac.critic.save_pretrained(p)
        return out
