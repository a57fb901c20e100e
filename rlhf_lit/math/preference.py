"""The DPO stage's knobs: which preference loss (DPO, IPO, SimPO, ORPO) and its constants."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_lit.math import losses


@dataclass
class DPOConfig:
    """The preference loss and its knobs (defaults: the DPO paper's beta 0.1)."""

    loss_type: str = "sigmoid"
    """sigmoid (DPO; with label_smoothing: conservative DPO), ipo, simpo or orpo (the last two reference-free)"""
    beta: float = 0.1
    """inverse temperature of the implicit reward (SimPO's paper uses about 2)"""
    label_smoothing: float = 0.0
    """conservative DPO: the assumed share of flipped labels, in [0, 0.5)"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin"""
    orpo_lambda: float = 0.1
    """ORPO's weight of the odds-ratio term against the chosen NLL"""
    cache_reference: bool = True
    """compute each pair's reference log-probs once (the first epoch) and reuse them afterwards"""

    def __post_init__(self):
        if self.loss_type not in losses.DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {losses.DPO_LOSSES}, got {self.loss_type!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5, got {self.beta}, {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"loss.label_smoothing {self.label_smoothing} applies to loss_type sigmoid (conservative DPO) "
                f"only; {self.loss_type} would ignore it"
            )

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in ("sigmoid", "ipo")
