"""Advantage estimators behind one interface, so an ablation swaps GAE for GRPO or RLOO in YAML.

Torch only. Each turns shaped per-token rewards into per-token advantages and returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lit.math import rl as ppo


class AdvantageEstimator:
    """Base class. ``needs_critic`` says whether the PPO module must run and train a value model;
    ``token_whitening`` whether ``algo.whiten_advantages`` applies to its advantages."""

    needs_critic: bool = True
    samples_per_prompt: int = 1
    token_whitening: bool = True

    def __call__(
        self, rewards: Tensor, values: Tensor | None, mask: Tensor, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """rewards, values, mask: (B, T): shaped per-token rewards (the score at the last token plus any
        per-token KL penalty); scores: (B,) the sequence scores before KL shaping (given by the PPO module
        to estimators whose ``__call__`` takes it). Returns (advantages, returns), both (B, T)."""
        raise NotImplementedError


class GAE(AdvantageEstimator):
    """Generalised advantage estimation against a learned critic (PPO's default in RLHF)."""

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        """
        Args:
            gamma: discount over response tokens.
            lam: GAE lambda (bias-variance trade-off).
        """
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"GAE needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma, self.lam = gamma, lam

    def __call__(self, rewards, values, mask, scores=None):
        return ppo.gae(rewards, values, mask, self.gamma, self.lam)


class GroupBaseline(AdvantageEstimator):
    """Critic-free: several samples per prompt, each sequence's summed reward against its group.

    The sequence reward is the score plus the summed KL penalty; its advantage is broadcast to every
    response token. ``baseline='grpo'`` normalises by the group std, ``'rloo'`` leaves one out.
    """

    needs_critic = False
    # Group advantages are already centred per prompt (and scaled, for GRPO). Whitening them again over
    # tokens weights long responses more and can flip signs: [1.276, 0.061, -0.182, -1.155] for responses
    # of 1, 1, 1 and 30 tokens became [4.675, 2.195, 1.699, -0.286] (issue #15). OpenRLHF does not
    # normalise group or leave-one-out advantages again, nor does TRL's GRPO.
    token_whitening = False

    def __init__(self, baseline: str = "grpo", samples_per_prompt: int = 4) -> None:
        """
        Args:
            baseline: 'grpo' (group mean and std), 'rloo' (leave-one-out mean) or 'mean' (group mean only,
                Dr. GRPO).
            samples_per_prompt: completions sampled for each prompt (the group size, >= 2).
        """
        if baseline not in ppo.GROUP_BASELINES:
            raise ValueError(f"baseline must be one of {ppo.GROUP_BASELINES}, got {baseline!r}")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
        self.baseline, self.samples_per_prompt = baseline, samples_per_prompt

    def __call__(self, rewards, values, mask, scores=None):
        adv = ppo.group_advantages((rewards * mask).sum(-1), self.samples_per_prompt, self.baseline)
        adv = adv.unsqueeze(-1) * mask
        return adv, adv


class GRPO(GroupBaseline):
    """Group-normalised advantages (Shao et al. 2024)."""

    def __init__(self, samples_per_prompt: int = 4) -> None:
        """
        Args:
            samples_per_prompt: completions sampled for each prompt (>= 2).
        """
        super().__init__("grpo", samples_per_prompt)


class DrGRPO(GroupBaseline):
    """GRPO without the std division (Liu et al. 2025, "Understanding R1-Zero-like training"). Pair it
    with ``algo.loss_agg: seq_mean_token_sum_norm`` for the paper's constant loss normaliser."""

    def __init__(self, samples_per_prompt: int = 4) -> None:
        """
        Args:
            samples_per_prompt: completions sampled for each prompt (>= 2).
        """
        super().__init__("mean", samples_per_prompt)


class RLOO(GroupBaseline):
    """REINFORCE leave-one-out baseline (Ahmadian et al. 2024)."""

    def __init__(self, samples_per_prompt: int = 4) -> None:
        """
        Args:
            samples_per_prompt: completions sampled for each prompt (>= 2).
        """
        super().__init__("rloo", samples_per_prompt)


class REINFORCEPP(AdvantageEstimator):
    """REINFORCE++ (Hu 2025): no critic; every token's advantage is its return (the score at the last
    token plus the per-token KL penalties after it), then normalised over the global batch's tokens
    (``algo.whiten_advantages``, on by default). One sample per prompt by default; with
    ``samples_per_prompt`` > 1 and ``group_baseline`` the group's mean score (before the KL penalties, as
    OpenRLHF's ``reinforce_baseline``) is subtracted from each score first (REINFORCE++-baseline)."""

    needs_critic = False

    def __init__(self, gamma: float = 1.0, samples_per_prompt: int = 1, group_baseline: bool = False) -> None:
        """
        Args:
            gamma: discount over response tokens.
            samples_per_prompt: completions sampled for each prompt.
            group_baseline: subtract each group's mean score (needs samples_per_prompt >= 2).
        """
        if not 0 <= gamma <= 1:
            raise ValueError(f"REINFORCEPP needs gamma in [0, 1], got {gamma}")
        if samples_per_prompt < 1 or (group_baseline and samples_per_prompt < 2):
            raise ValueError(f"samples_per_prompt must be >= 1 (>= 2 with group_baseline), got {samples_per_prompt}")
        self.gamma, self.samples_per_prompt, self.group_baseline = gamma, samples_per_prompt, group_baseline

    def __call__(self, rewards, values, mask, scores=None):
        if self.group_baseline:  # the group mean of the scores, taken off at the last token
            if scores is None:
                raise ValueError("REINFORCEPP(group_baseline=True) needs the sequence scores (scores=)")
            base = scores - ppo.group_advantages(scores, self.samples_per_prompt, "mean")
            rewards = rewards.clone()
            last = mask.sum(-1).long().clamp(min=1) - 1
            rewards[torch.arange(rewards.size(0)), last] -= base
        ret = ppo.discounted_returns(rewards, mask, self.gamma)
        return ret, ret
