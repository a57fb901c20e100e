"""SFT and reward-model losses as pure functions returning ``(loss, stats)``. Torch only.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lit.ops import masked_mean


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy averaged over the tokens where ``loss_mask`` is 1.

    logits: (B, T, V); input_ids, loss_mask: (B, T). Token t+1 is predicted from position t, so the
    mask is read on the target side: prompt tokens masked out (InstructGPT SFT) or all tokens in.
    """
    # Targets shifted left instead of logits shifted right: no copy of the (B, T, V) logits.
    mask = torch.cat([loss_mask[:, 1:], loss_mask.new_zeros(loss_mask.size(0), 1)], 1).float()
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
    nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    loss = masked_mean(nll.view_as(targets), mask)
    return loss, {"loss": loss.detach(), "tokens": mask.sum().detach()}


def pairwise_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss -log sigmoid(r_c - r_r - margin) on sequence scores. chosen, rejected, margin: (B,).

    ``margin`` follows Llama 2 (Touvron et al. 2023, eq. 2); ``center_coef`` adds
    coef * mean((r_c + r_r)^2), the reward-centering term of Eisenstein et al. (2023), so scores stay near 0.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss, pair_stats(chosen, rejected, loss)


def divergent_suffix_loss(
    chosen_values: Tensor,
    rejected_values: Tensor,
    chosen_ids: Tensor,
    rejected_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepSpeed-Chat's token-wise pairwise loss over the suffix where chosen and rejected differ.

    *_values, *_ids, *_mask: (B, T), right-padded to the same T; *_scores: (B,) read at the last
    attended token (for the stats). For each pair, -log sigmoid(v_c[t] - v_r[t]) is averaged over
    t in [first differing token, end of the longer sequence) (dschat/utils/model/reward_model.py).
    """
    t = torch.arange(chosen_ids.size(1), device=chosen_ids.device).expand_as(chosen_ids)
    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    big = torch.full_like(t, chosen_ids.size(1))
    start = torch.where(differs, t, big).min(-1, keepdim=True).values
    end = torch.maximum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)
    span = ((t >= start) & (t < end)).float()
    per_token = -F.logsigmoid(chosen_values.float() - rejected_values.float())
    loss = masked_mean(per_token, span, dim=-1).mean()
    return loss, pair_stats(chosen_scores, rejected_scores, loss)


def pair_stats(chosen: Tensor, rejected: Tensor, loss: Tensor) -> dict[str, Tensor]:
    """Accuracy, mean scores and margin of a batch of pairs. chosen, rejected: (B,)."""
    with torch.no_grad():
        c, r = chosen.float(), rejected.float()
        return {
            "loss": loss.detach(),
            "accuracy": (c > r).float().mean(),
            "chosen_score": c.mean(),
            "rejected_score": r.mean(),
            "margin": (c - r).mean(),
        }
