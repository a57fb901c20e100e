"""PPO's knobs in one room: :class:`PPOConfig`, validated in ``__post_init__`` (the ``algo`` config key).

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhf_lit.math.rl import KL_ESTIMATORS, LOSS_AGGREGATIONS


@dataclass
class PPOConfig:
    """The knobs of the PPO update (defaults: DeepSpeed-Chat's / InstructGPT's published settings)."""

    ppo_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """shuffled minibatches per pass (one optimizer step each)"""
    clip_eps: float = 0.2
    """policy ratio clip (the lower side, and the upper one unless clip_eps_high is set)"""
    clip_eps_high: Optional[float] = None
    """upper ratio clip, 1 + clip_eps_high (DAPO's clip-higher: 0.28 with clip_eps 0.2); None: clip_eps"""
    loss_agg: str = "token_mean"
    """how per-token policy (and KL) losses become one number: token_mean, seq_mean_token_mean (GRPO's
    paper) or seq_mean_token_sum_norm (Dr. GRPO: each sequence's sum / max_new_tokens)"""
    kl_in_loss: bool = False
    """put the KL to the reference in the loss (kl coefficient x kl_estimator on the current log-probs;
    the estimator then defaults to GRPO's k3) instead of in the reward; the rollout's KL is still measured
    and logged"""
    dynamic_sampling: bool = False
    """group estimators: drop groups whose scores are all equal (no signal from the scores; a KL penalty in
    the reward would still differ between their rows, as in DAPO, which filters on accuracy) and keep
    sampling batches until one full batch of informative groups is ready (DAPO); the excess is dropped"""
    overlong_filter: bool = False
    """leave responses cut at max_new_tokens without a stop token out of the loss (DAPO)"""
    overlong_buffer: Optional[int] = None
    """DAPO's soft overlong punishment: the score falls linearly by up to overlong_penalty over the last
    overlong_buffer tokens before max_new_tokens (None: off)"""
    overlong_penalty: float = 1.0
    """the score lost at max_new_tokens (with overlong_buffer)"""

    def fused(self, dropout_active: bool) -> bool:
        """Whether the first training forward can stand in for the scoring pass (see fuse_first_forward)."""
        return self.fuse_first_forward and self.ppo_epochs == 1 and self.num_minibatches == 1 and not dropout_active

    @property
    def entropy_bonus(self) -> bool:
        """Whether the loss has an entropy term; without one the entropy is only logged, computed without a graph."""
        return self.entropy_coef > 0

    value_clip: Optional[float] = 0.2
    """value clip around the rollout's values (None: plain squared error)"""
    vf_coef: float = 1.0
    """weight of the value loss in the combined loss"""
    entropy_coef: float = 0.0
    """entropy bonus weight"""
    kl_estimator: Optional[str] = None
    """per-token KL estimator: k1, k2 or k3 (default: k1 as a reward penalty, k3 with kl_in_loss). In the
    loss, k1's expected gradient on-policy is exactly 0 (it regularises nothing: refused); k2's is the
    gradient of KL(actor||ref), k3's that of KL(ref||actor) (#27)"""
    score_clip: Optional[float] = 5.0
    """clip rewards to ±score_clip (None: no clipping)"""
    whiten_advantages: bool = True
    """whiten GAE advantages over the batch's tokens (group estimators' advantages never are)"""
    whiten_rewards: bool = False
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of responses that hit max_new_tokens without eos"""
    ptx_coef: float = 0.0
    """weight of the pretraining/SFT loss mixed into the actor's (InstructGPT's gamma); needs ptx data"""
    ema_beta: Optional[float] = 0.992
    """EMA of the actor's weights after every step (None: no EMA)"""
    critic_lr: float = 5e-6
    """learning rate of the critic's parameter group"""
    max_ratio: Optional[float] = 20.0
    """skip a minibatch whose max policy ratio exceeds this (a diverged update; logged)"""
    fuse_first_forward: bool = True
    """with ppo_epochs 1 and one minibatch, take the old log-probs and values from the training forward
    (detached) instead of a separate scoring pass: same update, one actor+critic forward fewer. Only
    when no dropout is active (a train-mode forward with dropout is not the eval-mode scoring pass)"""
    actor_max_grad_norm: Optional[float] = 1.0
    """clip the actor's gradient to this norm (None: no clipping); actor and critic are clipped
    separately, as DeepSpeed-Chat's two engines do, so a large critic gradient never shrinks the actor's
    step. Under DeepSpeed the engine's ``gradient_clipping`` (one joint norm) applies instead"""
    critic_max_grad_norm: Optional[float] = 1.0
    """clip the critic's (or value head's) gradient to this norm (None: no clipping)"""
    tis_cap: Optional[float] = None
    """truncated importance sampling (Yao et al. 2025) when a separate engine samples (generation.engine:
    vllm): each token's policy loss is weighted by min(pi_trainer / pi_engine, tis_cap), correcting for
    the engine's numerics differing from the trainer's (e.g. 2.0; None: off)"""

    def __post_init__(self):
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("ppo_epochs and num_minibatches must be >= 1")
        if self.kl_estimator is None:
            self.kl_estimator = "k3" if self.kl_in_loss else "k1"
        if self.kl_in_loss and self.kl_estimator == "k1":
            raise ValueError(
                "algo.kl_in_loss with kl_estimator k1 regularises nothing (its expected gradient is 0): "
                "use k3 (GRPO's, the default with kl_in_loss) or k2"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or null, got {self.tis_cap}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ValueError(f"clip_eps_high must be > 0 or null, got {self.clip_eps_high}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.overlong_buffer is not None and self.overlong_buffer < 1:
            raise ValueError(f"overlong_buffer must be >= 1 or null, got {self.overlong_buffer}")
        if self.ema_beta is not None and not 0 < self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in (0, 1) or null, got {self.ema_beta}")
        if min(self.vf_coef, self.entropy_coef, self.ptx_coef, self.critic_lr) < 0:
            raise ValueError("vf_coef, entropy_coef, ptx_coef and critic_lr must be >= 0")
        for name in ("actor_max_grad_norm", "critic_max_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)}")


def check_parts(algo: PPOConfig, advantage, engine: str, has_critic: bool, value_head_on_actor: bool) -> None:
    """The parts a PPO run is given must fit together: refused here, before any model or data is loaded."""
    if engine == "vllm":
        from rlhf_lit.rl.vllm_engine import require_vllm

        require_vllm()  # a one-line error naming the install command
    if advantage.needs_critic and not has_critic and not value_head_on_actor:
        raise ValueError(
            f"{type(advantage).__name__} needs a critic: set model.critic (e.g. the reward export) or "
            "value_head_on_actor: true"
        )
    if algo.dynamic_sampling and advantage.samples_per_prompt < 2:
        raise ValueError("algo.dynamic_sampling needs a group estimator (samples_per_prompt >= 2), e.g. GRPO")
