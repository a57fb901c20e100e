"""PPO math for RLHF as pure tensor functions. Torch only: no lightning, deepspeed or wandb.

Every function takes explicit arguments (no config objects, no ``self``) so it can be unit-tested
against hand-computed values and a naive loop (tests/test_ppo_math.py). Losses return
``(loss, stats)``; stats are detached scalars, named without a namespace (the module adds ``ppo/``).

Shapes: ``B`` rollouts, ``T`` response tokens; ``mask`` is 1 on response tokens, 0 on padding after them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lit.math.ops import last_attended_index, masked_mean, masked_var, masked_whiten

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(actor || reference) from sampled tokens. (B, T) -> (B, T).

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2; k3 = (r - 1) - log r with
    r = q / p (unbiased and always >= 0). Schulman, "Approximating KL Divergence" (2020).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def shaped_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token rewards: -kl_coef * KL on every response token, the score added on the last one.

    scores: (B,); logprobs, ref_logprobs, mask: (B, T). Returns rewards (B, T) and stats with the
    per-sequence KL summed over tokens (InstructGPT eq. 2; Ziegler et al. 2019).
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    non_score = -kl_coef * kl
    last = last_attended_index(mask)
    rewards = non_score.clone()
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores.float()
    stats = {
        "kl": kl.sum(-1).mean().detach(),
        "non_score_reward": non_score.sum(-1).mean().detach(),
        "rlhf_reward": (scores.float() + non_score.sum(-1)).mean().detach(),
    }
    return rewards, stats


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    rewards, values, mask: (B, T). The value after the last response token is 0 (the episode ends).
    Returns (advantages, returns), both (B, T) and 0 where ``mask`` is 0; returns = advantages + values.
    """
    rewards, values = rewards.float() * mask, values.float() * mask
    last = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, sum_fn=None) -> Tensor:
    """Whitening of the valid (masked-in) entries; see :func:`rlhf_lit.math.ops.masked_whiten`."""
    return masked_whiten(x, mask, shift_mean=shift_mean, sum_fn=sum_fn)


GROUP_BASELINES = ("grpo", "rloo", "mean")


def group_advantages(scores: Tensor, group_size: int, baseline: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Critic-free, sequence-level advantages for ``group_size`` samples per prompt. (B,) -> (B,).

    Rows ``[g*k, (g+1)*k)`` are the k samples of prompt g. ``grpo``: (s - mean_group) / (std_group + eps)
    (Shao et al. 2024, DeepSeekMath). ``rloo``: s_i - mean of the other k-1 samples (Ahmadian et al. 2024).
    ``mean``: s - mean_group, not divided by the std (Dr. GRPO, Liu et al. 2025: the std favours prompts
    that are almost always solved or failed).
    """
    if group_size < 2:
        raise ValueError(f"group advantages need group_size >= 2, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"batch of {scores.numel()} scores is not a multiple of group_size={group_size}")
    s = scores.float().view(-1, group_size)
    if baseline == "grpo":
        adv = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + eps)
    elif baseline == "rloo":
        adv = s - (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    elif baseline == "mean":
        adv = s - s.mean(-1, keepdim=True)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {GROUP_BASELINES}")
    return adv.reshape(-1)


def varied_groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) scores -> (B,) bool: True for every row of a group whose scores are not all equal. A group
    with equal scores has zero group advantage from its scores: DAPO's dynamic sampling drops it (Yu et al.
    2025, who filter on accuracy). With a KL penalty in the reward its rows' advantages still differ by
    their penalties, so a dropped group did carry that (small) gradient."""
    s = scores.float().view(-1, group_size)
    return (s.amax(-1) > s.amin(-1)).repeat_interleave(group_size)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Per-token returns G_t = sum_{s >= t} gamma^(s-t) r_s over the response. (B, T) -> (B, T), 0 on
    padding. REINFORCE++ (Hu 2025) uses them as advantages, normalised over the global batch."""
    rewards = rewards.float() * mask
    out, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13). (B,) response lengths -> (B,) penalties:
    0 up to ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at ``max_len``, and
    ``-factor`` beyond it."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -factor * torch.where(lengths > max_len, torch.ones_like(over), over / buffer)


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(x: Tensor, mask: Tensor, mode: str = "token_mean", norm: float | None = None) -> Tensor:
    """Per-token losses (B, T) -> a scalar, the way the loss-aggregation papers compare.

    ``token_mean``: sum over every valid token of the batch / their count (PPO in RLHF; DAPO: every token
    weighs the same, so long responses weigh more). ``seq_mean_token_mean``: each sequence's token mean,
    then the mean over sequences (GRPO's paper: a token of a short response weighs more).
    ``seq_mean_token_sum_norm``: each sequence's token sum / ``norm`` (a constant, e.g. max_new_tokens),
    mean over sequences (Dr. GRPO, Liu et al. 2025: no length bias from the normaliser).
    The sequence means count only sequences with a valid token: a row masked out whole (DAPO's overlong
    filter) is out of the loss, not a zero that shrinks it by the filtered share (audit #27).
    """
    if mode == "token_mean":
        return masked_mean(x, mask)
    rows = (mask.sum(-1) > 0).to(x.dtype)
    if mode == "seq_mean_token_mean":
        return (masked_mean(x, mask, dim=-1) * rows).sum() / rows.sum().clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        if not norm or norm <= 0:
            raise ValueError("seq_mean_token_sum_norm needs a positive constant norm (e.g. max_new_tokens)")
        return ((x * mask).sum(-1) / norm * rows).sum() / rows.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token_mean",
    norm: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), aggregated over response tokens by ``agg``.

    All inputs (B, T); ``weights`` (B, T), no gradient, multiply each token's term (truncated importance
    sampling: :func:`tis_weights`). The ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high``
    defaults to clip_eps; DAPO's clip-higher raises it, e.g. 0.28, so low-probability tokens can grow).
    Where the ratio leaves that range in the direction the advantage favours, the clipped term is the
    max and carries no gradient.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.max(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, agg, norm)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def tis_weights(
    logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling weights (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"): the tokens were sampled by an engine whose probabilities differ from the
    trainer's for the same weights, so each token's policy term is weighted by min(pi_trainer / pi_engine,
    cap). logprobs (the trainer's old log-probs), engine_logprobs, mask: (B, T). Returns the (B, T)
    weights (1 where masked, no gradient) and their stats."""
    with torch.no_grad():
        ratio = torch.exp((logprobs - engine_logprobs) * mask)
        weights = torch.where(mask > 0, ratio.clamp(max=cap), torch.ones_like(ratio))
        stats = {
            "tis_weight_mean": masked_mean(weights, mask),
            "tis_clipped_frac": masked_mean((ratio > cap).float(), mask),
        }
    return weights, stats


def logprob_mismatch(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """|trainer log-prob - engine log-prob| over response tokens: mean and max. All (B, T)."""
    with torch.no_grad():
        diff = (logprobs - engine_logprobs).abs() * mask
        return {"logprob_diff_mean": masked_mean(diff, mask), "logprob_diff_max": diff.max()}


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    agg: str = "token_mean",
    norm: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A KL estimate as a loss term on the current log-probs instead of a reward penalty (GRPO, Shao et al.
    2024, eq. 4, with the k3 estimator). All inputs (B, T); the gradient flows through ``logprobs``. The
    caller multiplies by the KL coefficient. On-policy the *gradient* of each estimator's expectation is:
    k1: 0 (refused by PPOConfig); k2: that of KL(actor || reference); k3: that of KL(reference || actor),
    though k3's *value* estimates KL(actor || reference) (tested by exact expectation, #27)."""
    loss = aggregate(kl_penalty(logprobs, ref_logprobs, estimator), mask, agg, norm)
    return loss, {"kl_loss": loss.detach()}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, ±clip).

    All inputs (B, T). ``clip=None`` gives the plain squared error.
    """
    err = (values - returns) ** 2
    if clip is None:
        worst, clipfrac = err, torch.zeros((), device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        worst = torch.max(err, err_clipped)
        clipfrac = masked_mean((err_clipped > err).float(), mask).detach()
    loss = 0.5 * masked_mean(worst, mask)
    stats = {"value_loss": loss.detach(), "value_clipfrac": clipfrac, "value_error": masked_mean(err, mask).detach()}
    return loss, stats
