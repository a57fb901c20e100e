"""Stage 3: PPO of the actor against a reward source, with a critic, a frozen reference, a KL penalty,
an EMA of the actor and optional pretraining-loss mixing (InstructGPT; DeepSpeed-Chat step 3).

``training_step`` is one step of the algorithm; its two rooms are torch-only and unit-tested without a
Trainer: the experience (:mod:`rlhf_lit.rl.experience`: sample, score, reference and old log-probs, values)
and the update (:mod:`rlhf_lit.rl.update`: shaped rewards, advantages, minibatch losses, KL control). This
module keeps the Lightning lifecycle: building the models, the optimizer's groups, modes, resume, export.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable

from rlhf_lit.hf.models import LoRA, ModelSpec, apply_lora, has_dropout, merged, set_dropout
from rlhf_lit.math.estimators import GAE, AdvantageEstimator
from rlhf_lit.math.kl_control import FixedKL, KLController
from rlhf_lit.rl import experience
from rlhf_lit.rl.actor_critic import build_actor_critic
from rlhf_lit.rl.config import PPOConfig, check_parts
from rlhf_lit.rl.generation import GenerationConfig
from rlhf_lit.rl.rewards import RewardSource
from rlhf_lit.rl.update import PPOUpdate, ema_update, step_metrics
from rlhf_lit.training.optim import LRSchedule, param_groups
from rlhf_lit.training.stage_module import StageModule


class PPOModule(StageModule):
    """Manual optimization: each training step makes one rollout batch and runs the PPO epochs on it."""

    stage = "ppo"
    frozen = ("ref", "reward", "monitor", "ema")
    measure_throughput = False  # step_metrics reports prompts/s and tokens/s of each phase (time/*)

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
            reference: spec of the frozen reference (default: the actor's; with LoRA, the actor's adapters off).
            optimizer: optimizer class and arguments; its lr is the actor's (the critic's is algo.critic_lr).
            schedule: warmup + decay of both learning rates.
            weight_decay: decoupled weight decay of the weight matrices.
            kl: KL coefficient controller (default: fixed beta 0.05; a fixed 0: no KL, no reference built).
            advantage: advantage estimator: GAE (default), GRPO, DrGRPO, RLOO or REINFORCEPP.
            generation: rollout sampling settings.
            algo: the PPO update's knobs.
            lora: train low-rank adapters on the actor.
            monitor: a reward source scored on every rollout and logged as objective/monitor_scores but never
                trained on (e.g. the gold reward, to watch over-optimisation of the proxy).
            value_head_on_actor: values from a linear head on the actor's last hidden state, not a critic.
            samples_every: keep prompt/response/score samples for the sample table every n steps.
            dropout: every dropout probability of actor and critic: 0 (default) turns it off, as DeepSpeed-Chat
                and OpenRLHF do in RL (the ratio compares the same function); None keeps the checkpoints'.
            frozen_dtype: storage of the frozen reference, reward and monitor: bfloat16 (default; computed in
                fp32 where the CPU has no bf16 units), float16 or float32. The EMA stays fp32.
            critic_lora: low-rank adapters on the critic's backbone (its value head trained in full).
        """
        super().__init__(optimizer, schedule, weight_decay, frozen_dtype)
        self.save_hyperparameters(ignore=["reward", "monitor"])
        self.automatic_optimization = False
        self.refuse_reference_with_lora(lora, reference, "actor")
        self.actor_spec, self.critic_spec, self.ref_spec = actor, critic, reference or actor
        self.reward, self.lora, self.critic_lora, self.monitor = reward, lora, critic_lora, monitor
        self.kl, self.advantage = kl or FixedKL(0.05), advantage or GAE()
        self.gen, self.algo = generation or GenerationConfig(), algo or PPOConfig()
        check_parts(self.algo, self.advantage, self.gen.engine, critic is not None, value_head_on_actor)
        self.value_head_on_actor = value_head_on_actor and self.advantage.needs_critic
        self.samples_every, self.dropout, self.dropout_active = samples_every, dropout, False
        self.updater = PPOUpdate(
            self.algo, self.kl, self.advantage, self.gen.max_new_tokens, self.gen.temperature, ranks=self.ranks
        )
        self.ac = self.ref = self.ema = self.engine = None  # engine: generation.engine vllm, built at the first rollout
        self.samples: list[dict] = []
        self.buffer: Optional[experience.InformativeBuffer] = None  # dynamic sampling: informative groups waiting
        self.timing: dict[str, float] = {}  # the last step's generate / score / train (/ sync) seconds

    def configure_model(self) -> None:
        if self.ac is not None:
            return
        critic = self.critic_spec if self.advantage.needs_critic and not self.value_head_on_actor else None
        self.ac = build_actor_critic(
            self.actor_spec, self.tokenizer, self.lora, critic, self.critic_lora, self.value_head_on_actor
        )
        if self.dropout is not None:
            set_dropout(self.ac, self.dropout)
        self.dropout_active = has_dropout(self.ac)  # then a train-mode forward is not the scoring pass
        if self.lora is None and not self.kl.off:
            self.ref = self.ref_spec.build_causal_lm(self.tokenizer).eval().requires_grad_(False)
        for source in [s for s in (self.reward, self.monitor) if s is not None]:
            source.build(self.tokenizer)
            source.eval().requires_grad_(False)
        self.hold_frozen(self.ref, self.reward, self.monitor, dtype=self.frozen_dtype)
        if self.algo.ema_beta is not None:  # built like the actor (partitioned under ZeRO-3), then copied
            self.ema = apply_lora(self.actor_spec.build_causal_lm(self.tokenizer), self.lora)
            ema_update(self.ema.eval().requires_grad_(False), self.ac.policy, beta=0.0)
        self.train()  # actor and critic train, the frozen models stay in eval (from_pretrained returns eval; #13)

    def trainable_groups(self):
        groups = param_groups(self.ac.policy, self.weight_decay)
        if self.ac.has_values:
            groups += param_groups(self.ac.critic or self.ac.value_head, self.weight_decay, lr=self.algo.critic_lr)
        return groups

    @property
    def steps_per_batch(self) -> int:
        return self.algo.ppo_epochs * self.algo.num_minibatches

    # -- the algorithm ------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        prompts, ptx = (batch["prompts"], batch["ptx"]) if "prompts" in batch else (batch, None)
        fused = self.algo.fused(self.dropout_active)
        # 1. experience: sample, score, reference log-probs (and old log-probs and values, unless fused)
        ro = self.rollout(prompts, score_policy=not fused)
        # 2. DAPO's dynamic sampling: no update until a full batch of informative groups is pending
        if self.algo.dynamic_sampling and (ro := self.informative(ro)) is None:
            return
        # 3. the update: shaped rewards, advantages, the PPO epochs' minibatch steps, the KL controller
        t0 = time.perf_counter()
        out = experience.fill_from_forward(self.ac, ro, self.gen.temperature, self.algo) if fused else None
        result = self.updater.run(self.ac, ro, self.take_step, ptx, out)
        # 4. the engine samples the next rollout with the new weights; logs and the sample table
        self.timing = {**ro.timing, "train_s": time.perf_counter() - t0}
        if self.engine is not None and result.per_step:
            self.timing["sync_s"] = self.engine.sync(self.ac.policy)
        if self.logging_step():
            logs = step_metrics(ro, result, self.timing, self.kl.value, self.reward, self.monitor)
            self.log_dict(logs, prog_bar=False, batch_size=ro.mask.size(0))
            self.log("objective/scores_pb", ro.scores.mean(), prog_bar=True, logger=False)
        if self.samples_every and batch_idx % self.samples_every == 0:
            self.samples = experience.sample_rows(ro)

    def rollout(self, batch, score_policy: bool = True) -> experience.Rollout:
        ids, mask, prompts, columns = experience.repeat_groups(batch, self.advantage.samples_per_prompt)
        if self.gen.engine == "vllm" and self.engine is None:  # after any checkpoint restore: current weights
            from rlhf_lit.rl.vllm_engine import VLLMEngine

            self.engine = VLLMEngine.colocated(self.ac.policy, self.tokenizer, self.gen.vllm, self.global_rank)
        adapters = self.lora is not None and not self.kl.off  # the reference: the actor, adapters off
        return experience.make_rollout(self.ac, self.ref, self.reward, self.tokenizer, ids, mask, prompts,
                                       self.gen, adapters, score_policy=score_policy, columns=columns,
                                       engine=self.engine)  # fmt: skip

    def informative(self, ro: experience.Rollout) -> Optional[experience.Rollout]:
        """DAPO's dynamic sampling: a full batch (as many rows as this rollout) of groups whose scores
        differ once enough are pending, else None. Every rank decides together."""
        k, pad = self.advantage.samples_per_prompt, self.tokenizer.pad_token_id
        self.buffer = self.buffer or experience.InformativeBuffer(k, pad)
        self.log("rollout/informative_fraction", self.buffer.add(ro), batch_size=ro.mask.size(0))
        return self.buffer.ready(ro.mask.size(0), self.any_rank)

    def take_step(self, loss: torch.Tensor) -> dict:
        """One optimizer step of actor and critic (one engine, each clipped to its own norm), then the EMA."""
        a = self.algo
        stats = self.manual_step(loss, self.ac.clip_groups(a.actor_max_grad_norm, a.critic_max_grad_norm))
        if self.ema is not None:
            ema_update(self.ema, self.ac.policy, a.ema_beta)
        return stats

    def teardown(self, stage: str) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # -- resume and export ----------------------------------------------------------------------
    def checkpointed_parts(self) -> dict:
        return {"kl_controller": self.kl}

    def export_models(self):
        save = lambda m: lambda out: merged(m).save_pretrained(out, safe_serialization=True)
        out = {"actor": save(self.ac.policy)}
        if self.ema is not None:
            out["actor_ema"] = save(self.ema)
        if self.ac.critic is not None:
            out["critic"] = lambda p: self.ac.critic.save_pretrained(p)
        return out
