"""SFT and reward-model losses as pure functions returning ``(loss, stats)``. Torch only.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lit.math.ops import masked_mean


def sft_loss(next_logprobs: Tensor, loss_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy averaged over the tokens where ``loss_mask`` is 1.

    next_logprobs: (B, T - 1), entry t the log-prob of token t+1 at position t (from
    :func:`rlhf_lit.hf.models.next_token_logprobs`, which never makes the (B, T, V) logits); loss_mask: (B, T),
    read on the target side: prompt tokens masked out (InstructGPT SFT) or all tokens in.
    """
    mask = loss_mask[:, 1:].float()
    loss = masked_mean(-next_logprobs.float(), mask)
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


DPO_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_len: Tensor,
    rejected_len: Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO family on summed response log-probs. All inputs (B,); ``*_len``: response tokens.

    - ``sigmoid``: DPO (Rafailov et al. 2023), -log sigmoid(beta * h) with h = (pi_c - ref_c) - (pi_r - ref_r);
      ``label_smoothing`` eps gives conservative DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    - ``ipo``: (h - 1 / (2 beta))^2 (Azar et al. 2023) on length-averaged log-probs, as TRL does.
    - ``simpo``: reference-free, -log sigmoid(beta * (avg pi_c - avg pi_r) - simpo_gamma) (Meng et al. 2024).
    - ``orpo``: reference-free, the chosen NLL (length-averaged) + orpo_lambda * -log sigmoid(log odds ratio)
      of the length-averaged probabilities (Hong et al. 2024).

    Stats: the implicit rewards beta * (pi - ref) (length-averaged for IPO, as it optimises them; beta * avg pi
    without a reference), their accuracy and margin, and the log-probs. ``label_smoothing`` with any loss but
    sigmoid is an error (it would be ignored).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown preference loss {loss_type!r}; choose one of {DPO_LOSSES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss (conservative DPO) only, not {loss_type!r}")
    pc, pr = policy_chosen.float(), policy_rejected.float()
    cl, rl = chosen_len.float().clamp(min=1), rejected_len.float().clamp(min=1)
    if loss_type in ("sigmoid", "ipo"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {loss_type!r} loss needs reference log-probs")
        rc, rr = ref_chosen.float(), ref_rejected.float()
        if loss_type == "sigmoid":
            h = beta * ((pc - rc) - (pr - rr))
            loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
            chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        else:  # the stats report the length-averaged log-ratios IPO optimises, not the summed ones (audit #27)
            h = (pc - rc) / cl - (pr - rr) / rl
            loss = (h - 1 / (2 * beta)) ** 2
            chosen_reward, rejected_reward = beta * (pc - rc) / cl, beta * (pr - rr) / rl
    else:
        avg_c, avg_r = pc / cl, pr / rl
        if loss_type == "simpo":
            loss = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        else:  # log odds(p) = log p - log(1 - p), with p the length-averaged token probability
            log_odds = (avg_c - torch.log1p(-avg_c.exp().clamp(max=1 - 1e-6))) - (
                avg_r - torch.log1p(-avg_r.exp().clamp(max=1 - 1e-6))
            )
            loss = -avg_c - orpo_lambda * F.logsigmoid(log_odds)
        chosen_reward, rejected_reward = beta * avg_c, beta * avg_r
    loss = loss.mean()
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "chosen_logp": pc.mean(),
            "rejected_logp": pr.mean(),
        }
    return loss, stats
