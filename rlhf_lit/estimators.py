"""Advantage estimators behind one interface, so an ablation swaps GAE for GRPO or RLOO in YAML.

Torch only. Each turns shaped per-token rewards into per-token advantages and returns.
"""

from __future__ import annotations

from torch import Tensor

from rlhf_lit import ppo


class AdvantageEstimator:
    """Base class. ``needs_critic`` says whether the PPO module must run and train a value model;
    ``token_whitening`` whether ``algo.whiten_advantages`` applies to its advantages."""

    needs_critic: bool = True
    samples_per_prompt: int = 1
    token_whitening: bool = True

    def __call__(self, rewards: Tensor, values: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        """rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T)."""
        raise NotImplementedError


class GAE(AdvantageEstimator):
    """Generalised advantage estimation against a learned critic (PPO's default in RLHF)."""

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        """Args:
        gamma: discount over response tokens.
        lam: GAE lambda (bias-variance trade-off).
        """
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"GAE needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma, self.lam = gamma, lam

    def __call__(self, rewards, values, mask):
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
        """Args:
        baseline: 'grpo' (group mean and std) or 'rloo' (leave-one-out mean).
        samples_per_prompt: completions sampled for each prompt (the group size, >= 2).
        """
        if baseline not in ("grpo", "rloo"):
            raise ValueError(f"baseline must be 'grpo' or 'rloo', got {baseline!r}")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
        self.baseline, self.samples_per_prompt = baseline, samples_per_prompt

    def __call__(self, rewards, values, mask):
        adv = ppo.group_advantages((rewards * mask).sum(-1), self.samples_per_prompt, self.baseline)
        adv = adv.unsqueeze(-1) * mask
        return adv, adv


class GRPO(GroupBaseline):
    """Group-normalised advantages (Shao et al. 2024)."""

    def __init__(self, samples_per_prompt: int = 4) -> None:
        """Args:
        samples_per_prompt: completions sampled for each prompt (>= 2).
        """
        super().__init__("grpo", samples_per_prompt)


class RLOO(GroupBaseline):
    """REINFORCE leave-one-out baseline (Ahmadian et al. 2024)."""

    def __init__(self, samples_per_prompt: int = 4) -> None:
        """Args:
        samples_per_prompt: completions sampled for each prompt (>= 2).
        """
        super().__init__("rloo", samples_per_prompt)
