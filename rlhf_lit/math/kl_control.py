"""KL coefficient controllers: a fixed beta, or the adaptive one of Ziegler et al. (2019), section 2.2.

Each exposes ``value``, ``update(current_kl, n_steps)`` and ``state_dict``/``load_state_dict`` so a
resumed run continues with the same beta.
"""

from __future__ import annotations


class KLController:
    """Base class: a KL penalty coefficient that may change with the observed KL."""

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    @property
    def off(self) -> bool:
        """A coefficient that is 0 and stays 0: no KL penalty or loss anywhere, so no reference is needed."""
        return False

    def update(self, current_kl: float, n_steps: int) -> None:
        """Called once per rollout batch with the mean per-sequence KL and the number of sequences."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKL(KLController):
    """A constant beta."""

    def __init__(self, value: float = 0.05) -> None:
        """
        Args:
            value: the KL coefficient beta.
        """
        super().__init__(value)

    @property
    def off(self) -> bool:
        return self.value == 0


class AdaptiveKL(KLController):
    """Proportional controller: beta_{t+1} = beta_t * (1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init: float = 0.05, target: float = 6.0, horizon: int = 10000) -> None:
        """
        Args:
            init: the starting beta.
            target: the per-sequence KL the controller aims at (nats).
            horizon: how many sequences it takes to correct a full error.
        """
        super().__init__(init)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
