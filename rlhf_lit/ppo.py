"""PPO math for RLHF as pure tensor functions. Torch only: no lightning, deepspeed or wandb.

Every function takes explicit arguments (no config objects, no ``self``) so it can be unit-tested
against hand-computed values and a naive loop (tests/test_ppo_math.py). Losses return
``(loss, stats)``; stats are detached scalars, named without a namespace (the module adds ``ppo/``).

Shapes: ``B`` rollouts, ``T`` response tokens; ``mask`` is 1 on response tokens, 0 on padding after them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lit.ops import last_attended_index, masked_mean, masked_var, masked_whiten

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
    """Whitening of the valid (masked-in) entries; see :func:`rlhf_lit.ops.masked_whiten`."""
    return masked_whiten(x, mask, shift_mean=shift_mean, sum_fn=sum_fn)


def group_advantages(scores: Tensor, group_size: int, baseline: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Critic-free, sequence-level advantages for ``group_size`` samples per prompt. (B,) -> (B,).

    Rows ``[g*k, (g+1)*k)`` are the k samples of prompt g. ``grpo``: (s - mean_group) / (std_group + eps)
    (Shao et al. 2024, DeepSeekMath). ``rloo``: s_i - mean of the other k-1 samples (Ahmadian et al. 2024).
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
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose 'grpo' or 'rloo'")
    return adv.reshape(-1)


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), averaged over response tokens.

    All inputs (B, T). Where the ratio leaves [1-eps, 1+eps] in the direction the advantage favours,
    the clipped term is the max and carries no gradient.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


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
