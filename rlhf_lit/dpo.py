"""The DPO stage's knobs and the sequence log-probs its losses compare. Torch only (no lightning).

Shapes: ``B`` pairs; batches hold the B chosen rows, then the B rejected ones, right-padded to ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lit import losses
from rlhf_lit.models import lm_inputs, next_token_logprobs


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


def response_logps(model, input_ids, attention_mask, prompt_len):
    """Summed log-probs of the response tokens and their count. input_ids, attention_mask: (2B, T), the B
    chosen rows then the B rejected ones; prompt_len: (B,). Returns two (2B,) tensors."""
    lp = next_token_logprobs(model, **lm_inputs(model, input_ids, attention_mask))
    pos = torch.arange(1, input_ids.size(1), device=input_ids.device)
    response = (pos[None] >= prompt_len.repeat(2)[:, None]) & attention_mask[:, 1:].bool()
    return (lp * response).sum(-1), response.sum(-1)
