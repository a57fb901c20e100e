"""PPO's update room: one rollout batch in, optimizer steps out, without Lightning.

1. shaped rewards: the score after its penalties and clip on the last token, minus the KL penalty per token;
2. advantages and returns from the injected estimator (GAE's whitened over the batch's tokens);
3. for each PPO epoch, for each shuffled minibatch: the clipped policy loss (+ the KL in the loss, the value
   loss, the entropy bonus, the ptx loss), skipped on every rank when it diverged, else the caller's step;
4. the KL controller sees the rollout's KL averaged over ranks.

The optimizer step and the collectives come in as callables, so the whole update runs in a unit test with a
plain torch optimizer (tests/test_ppo_update.py). Shapes: ``B`` rollouts, ``R`` response tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.hf.models import gathered, lm_inputs, next_token_logprobs
from rlhf_lit.math import losses
from rlhf_lit.math import rl as ppo
from rlhf_lit.math.estimators import AdvantageEstimator
from rlhf_lit.math.kl_control import KLController
from rlhf_lit.math.ops import masked_mean
from rlhf_lit.rl.actor_critic import ActorCritic
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.experience import Rollout, penalised_scores
from rlhf_lit.rl.rewards import score


@dataclass
class Ranks:
    """The collectives the update needs across data-parallel ranks (identities on one process)."""

    sum: Callable[[Tensor], Tensor] = lambda t: t
    """sum of a tensor over ranks (global whitening)"""
    any: Callable[[Tensor], bool] = lambda t: bool(t)
    """True on every rank when it is True on any (every rank skips a diverged minibatch together)"""
    mean: Callable[[Tensor], Tensor] = lambda t: t
    """mean over ranks (the KL the controller sees)"""
    world_size: int = 1


@dataclass
class UpdateResult:
    """What one update did: the per-optimizer-step stats, the minibatches skipped, the rollout's KL stats
    and the engine-mismatch stats (vLLM rollouts)."""

    per_step: list[dict] = field(default_factory=list)
    skipped: int = 0
    kl_stats: dict = field(default_factory=dict)
    engine_stats: dict = field(default_factory=dict)


class PPOUpdate:
    """The update half of a PPO step over an :class:`ActorCritic`."""

    def __init__(
        self,
        algo: PPOConfig,
        kl: KLController,
        advantage: AdvantageEstimator,
        max_new_tokens: int,
        temperature: float = 1.0,
        ranks: Callable[[], Ranks] = Ranks,
    ) -> None:
        """``ranks`` gives the run's collectives when the update runs (a Trainer knows its world size only
        after setup); the default: one process."""
        self.algo, self.kl, self.advantage, self.get_ranks = algo, kl, advantage, ranks
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        # estimators written before REINFORCE++'s scores= argument take (rewards, values, mask) only
        self.takes_scores = "scores" in inspect.signature(advantage.__call__).parameters

    @property
    def ranks(self) -> Ranks:
        return self.get_ranks()

    def rewards(self, ro: Rollout) -> tuple[Tensor, dict, Tensor]:
        """Clipped (eos- and overlong-penalised) scores plus the per-token KL penalty (none when the KL is
        in the loss). Returns rewards (B, R), stats (no KL stats without a reference) and the (B,) scores."""
        a, scores = self.algo, penalised_scores(ro, self.algo, self.max_new_tokens)
        ref = ro.ref_logprobs if ro.ref_logprobs is not None else ro.logprobs
        coef = 0.0 if a.kl_in_loss else self.kl.value
        rewards, stats = ppo.shaped_rewards(scores, ro.logprobs, ref, ro.mask, coef, a.kl_estimator)
        if ro.ref_logprobs is None:
            stats = {"rlhf_reward": stats["rlhf_reward"]}
        if a.whiten_rewards:
            rewards = ppo.whiten(rewards, ro.mask, shift_mean=False, sum_fn=self.ranks.sum)
        return rewards, stats, scores

    def advantages(self, rewards: Tensor, values: Optional[Tensor], mask: Tensor, scores: Optional[Tensor] = None):
        """The estimator's advantages and returns (B, R); GAE's whitened over the batch's tokens."""
        adv, ret = self.advantage(rewards, values, mask, **({"scores": scores} if self.takes_scores else {}))
        if self.algo.whiten_advantages and self.advantage.token_whitening:
            adv = ppo.whiten(adv, mask, sum_fn=self.ranks.sum)
        return adv, ret

    def engine_mismatch(self, ro: Rollout) -> tuple[Optional[Tensor], dict]:
        """Engine-sampled rollouts: the engine's log-probs against the trainer's and, with algo.tis_cap, the
        truncated importance sampling weights (B, R). Returns (weights or None, stats)."""
        if ro.engine_logprobs is None:
            return None, {}
        stats = ppo.logprob_mismatch(ro.logprobs, ro.engine_logprobs, ro.mask)
        if self.algo.tis_cap is None:
            return None, stats
        weights, tis_stats = ppo.tis_weights(ro.logprobs, ro.engine_logprobs, ro.mask, self.algo.tis_cap)
        return weights, {**stats, **tis_stats}

    def minibatch_loss(self, ac: ActorCritic, ro: Rollout, idx: Tensor, adv, ret, ptx=None, out=None, tis=None):
        """The combined loss of rows ``idx``. ``out``: the whole batch's (logprobs, entropy, values) forward
        when already computed (fused); ``tis``: (B, R) truncated importance sampling weights."""
        a, norm, mask = self.algo, float(self.max_new_tokens), ro.mask[idx]
        if a.overlong_filter:  # truncated responses carry no signal about where to stop (DAPO)
            mask = mask * ro.ended[idx].unsqueeze(-1).float()
        if out is None:
            out = ac(ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, self.temperature, a.entropy_bonus)
        else:
            out = tuple(t[idx] if t is not None else None for t in out)
        logprobs, entropy, values = out
        weights = None if tis is None else tis[idx]
        loss, stats = ppo.policy_loss(
            logprobs, ro.logprobs[idx], adv[idx], mask, a.clip_eps, a.clip_eps_high, a.loss_agg, norm, weights
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
            inputs = lm_inputs(ac.policy, ptx["input_ids"], ptx["attention_mask"])
            lp = next_token_logprobs(ac.policy, ptx["loss_mask"], **inputs)
            ptx_loss, _ = losses.sft_loss(lp, ptx["loss_mask"])
            loss, stats["ptx_loss"] = loss + a.ptx_coef * ptx_loss, ptx_loss.detach()
        return loss, stats

    def diverged(self, loss: Tensor, ratio_max: Tensor) -> bool:
        """A non-finite loss or an exploding policy ratio on any rank: every rank skips together (a step
        taken by some ranks only would leave the others waiting in the gradient all-reduce)."""
        bad = (~torch.isfinite(loss.detach())) | (ratio_max > (self.algo.max_ratio or float("inf")))
        return self.ranks.any(bad)

    def run(self, ac: ActorCritic, ro: Rollout, step: Callable[[Tensor], dict], ptx=None, out=None) -> UpdateResult:
        """Steps 1-4 above on rollout ``ro``. ``step(loss)`` back-propagates and steps the optimizer, returning
        stats (gradient norms); ``out``: the fused first forward (see PPOConfig.fuse_first_forward)."""
        rewards, kl_stats, scores = self.rewards(ro)
        adv, ret = self.advantages(rewards, ro.values, ro.mask, scores)
        tis, engine_stats = self.engine_mismatch(ro)
        result, n = UpdateResult(kl_stats=kl_stats, engine_stats=engine_stats), ro.mask.size(0)
        for _ in range(self.algo.ppo_epochs):
            for idx in torch.randperm(n, device=ro.mask.device).chunk(min(self.algo.num_minibatches, n)):
                loss, stats = self.minibatch_loss(ac, ro, idx, adv, ret, ptx, out, tis)
                if self.diverged(loss, stats["ratio_max"]):
                    result.skipped += 1  # a diverged update: skip it rather than poison the weights
                    continue
                result.per_step.append({**stats, **step(loss)})
        # Every rank must hold the same beta: the controller sees the KL averaged over ranks.
        if "kl" in kl_stats:
            self.kl.update(float(self.ranks.mean(kl_stats["kl"])), n * self.ranks.world_size)
        return result


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameter by parameter (DeepSpeed-Chat's beta 0.992; ZeRO-3
    partitions gathered first). The EMA is kept in fp32: bf16 would round away (1 - beta) updates."""
    pairs = list(zip(ema.parameters(), model.parameters()))
    with gathered([p for pair in pairs for p in pair], modifier_rank=0):
        for e, p in pairs:
            e.lerp_(p.detach().to(e.dtype), 1.0 - beta)


def step_metrics(ro: Rollout, result: UpdateResult, timing: dict, kl_coef: float, reward=None, monitor=None) -> dict:
    """Everything one PPO step logs: objective (scores, KL and the rest of the rollout's KL stats, entropy,
    the KL coefficient, the monitor's scores: a reward source watched, never trained on), the rollout's shape
    and engine mismatch, the update's mean ``ppo/`` stats over its optimizer steps, rows the reward model's
    own tokenizer cut, and the phases' timing."""
    seconds = max(sum(timing.values()), 1e-9)
    logs = {
        "objective/scores": ro.scores.mean(),
        **{f"objective/{k}": v for k, v in result.kl_stats.items()},  # kl, non_score_reward, rlhf_reward
        "objective/entropy": masked_mean(ro.entropy, ro.mask),
        "objective/kl_coef": kl_coef,
        "rollout/response_len_mean": ro.mask.sum(-1).mean(),
        "rollout/eos_fraction": ro.eos_fraction,
        **{f"rollout/{k}": v for k, v in result.engine_stats.items()},
        "ppo/skipped_minibatches": float(result.skipped),
        **{f"time/{k}": v for k, v in timing.items()},
        "time/tokens_per_s": float(ro.mask.sum()) / seconds,
        "time/prompts_per_s": ro.mask.size(0) / seconds,
    }
    for key in result.per_step[0] if result.per_step else []:
        logs[f"ppo/{key}"] = torch.stack([s[key] for s in result.per_step]).mean()
    if getattr(reward, "truncated", None) is not None:
        logs["reward/truncated_rows"] = float(reward.truncated)
    if monitor is not None:
        logs["objective/monitor_scores"] = score(
            monitor, ro.prompts, ro.responses, ro.input_ids, ro.attention_mask, ro.columns, ro.ended
        ).mean()
    return logs
