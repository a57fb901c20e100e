"""Masked tensor helpers shared by every stage. Torch only: no lightning, deepspeed or wandb.

Shapes: ``B`` batch, ``T`` time (tokens), ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# fp32 logits per LM-head chunk in chunked_logprobs: 64 MiB is 341 positions of SmolLM2's 49,152-token
# vocabulary, against 800 MiB for the (8, 512, V) logits of a training batch. Below it one plain pass: the
# chunks' recomputation made tiny-model SFT (a 4,096-token head, most of its FLOPs) 1.45x slower.
LOGIT_BUDGET = 64 * 2**20


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. x, mask: same shape."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 where nothing is masked in)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (Bessel-corrected by default, as TRL and trlx)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    sum_fn: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Normalise the valid entries of ``x`` to zero mean and unit variance; masked entries become 0.

    Equal to whitening ``x[mask.bool()]`` on its own (tested). ``shift_mean=False`` keeps the mean,
    as PPO implementations do for rewards (only the scale is normalised). ``sum_fn`` sums a tensor over
    data-parallel ranks, so the statistics are the global batch's, not each shard's.
    """
    if sum_fn is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        s = sum_fn(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
        n = s[2].clamp(min=1)
        mean = s[0] / n
        var = ((s[1] / n - mean**2) * n / (n - 1).clamp(min=1)).clamp(min=0)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under ``logits``. logits: (B, T, V), labels: (B, T) -> (B, T).

    Naive equivalent: ``torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]``;
    logsumexp avoids materialising a second (B, T, V) tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(
    hidden: Tensor, targets: Tensor, head: Callable, temperature: float, entropy: bool, entropy_grad: bool = True
) -> Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp[None]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = logsumexp - E_p[logit]
    return torch.stack([logp, ent])


def chunked_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk: Optional[int] = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs of ``targets`` (and the entropies) without a (B, T, V) tensor: the LM head and the
    log-softmax run on ``chunk`` positions at a time (default: as many as ``LOGIT_BUDGET`` of fp32 logits
    holds). hidden: (B, T, H) states the head reads (or logits with ``head`` the identity), targets:
    (B, T) -> logp, entropy: (B, T) (entropy None unless asked).

    Under autograd each chunk is checkpointed: its fp32 logits are recomputed in backward instead of being
    kept (the idea of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, without a custom
    kernel), so the memory beyond the hidden states is one chunk's logits, at the cost of the head's
    forward once more. Equal to ``logprobs_from_logits(head(hidden) / temperature, targets)`` (tested).
    ``entropy_grad=False``: the entropies without a graph, for a loss that only logs them (PPO without an
    entropy bonus): their softmax over the vocabulary gets no backward, 0.28 s of a SmolLM2 PPO step (#30).
    """
    b, t = targets.shape
    flat_h, flat_t = hidden.reshape(b * t, -1), targets.reshape(-1)
    if chunk is None:
        vocab = getattr(head, "out_features", None) or hidden.size(-1)
        chunk = max(1, LOGIT_BUDGET // (4 * vocab))
    if b * t <= chunk:  # small enough for one plain pass
        out = _chunk_logprobs(flat_h, flat_t, head, temperature, entropy, entropy_grad).view(-1, b, t)
        return out[0], _entropy(out, entropy, entropy_grad)
    track = torch.is_grad_enabled() and (
        flat_h.requires_grad or any(p.requires_grad for p in getattr(head, "parameters", list)())
    )
    parts = []
    for i in range(0, max(b * t, 1), chunk):
        args = (flat_h[i : i + chunk], flat_t[i : i + chunk], head, temperature, entropy, entropy_grad)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if track else _chunk_logprobs(*args))
    out = torch.cat(parts, 1).view(-1, b, t)
    return out[0], _entropy(out, entropy, entropy_grad)


def _entropy(out: Tensor, entropy: bool, entropy_grad: bool) -> Optional[Tensor]:
    # out (2, B, T) stacks log-probs and entropies; a logged entropy leaves the stack's graph
    return None if not entropy else out[1] if entropy_grad else out[1].detach()


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over attended tokens only, so left padding does not shift them. (B, T) -> (B, T).

    GPT-2-style models derive positions from the index otherwise, which is wrong for left-padded rows.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_attended_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended token of each row, for left or right padding. (B, T) -> (B,).

    Read from the mask, never by searching pad ids: pad may equal eos, and eos may be inside a row.
    """
    t = attention_mask.size(-1)
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values.clamp(min=0)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Pad id lists to the longest. Returns (ids, attention_mask), both (B, T) long."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def segment_attention(segments: Tensor, shared: Optional[int] = None) -> Tensor:
    """Who may attend to whom in rows holding several sequences: segments (B, T), 0 for padding -> a bool
    mask (B, 1, T, T), True where a token may attend: causally within its own segment, and to the earlier
    tokens of segment ``shared`` (a prompt the other segments continue). Padding attends to itself only,
    so no softmax row is empty."""
    t = segments.size(1)
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    visible = key == query
    if shared is not None:
        visible = visible | (key == shared)
    attend = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril() & (query > 0) & visible
    return (attend | torch.eye(t, dtype=torch.bool, device=segments.device)).unsqueeze(1)


def pack_shared_prompt(ids: Tensor, mask: Tensor, prompt_len: Tensor, pad_id: int, groups: int = 2):
    """Rows that share a prompt in groups (row ``g * B + b`` is response g to prompt b, its first
    ``prompt_len[b]`` tokens the prompt, right-padded) -> one row per prompt: the prompt once, then each
    response after it, right-padded to the longest such row.

    Returns ids (B, L); a bool mask (B, 1, L, L), True where a token may attend: a prompt token to the
    prompt before it, a response token to the prompt and to its own response before it, never to another
    response (padding attends to itself only, so no softmax row is empty); position_ids (B, L), each
    response continuing from the prompt's end as if it stood alone; last (B, G), the index in its row of
    each response's last token. Attention sees what it would see in the G whole sequences, so scores read
    at ``last`` equal theirs, for P + G*R tokens a prompt instead of G*(P + R) (#30)."""
    b = prompt_len.numel()
    lens, pl = mask.sum(1).tolist(), prompt_len.tolist()
    rows, segs, pos, last = [], [], [], []
    for i in range(b):
        row, seg, posn, ends = ids[i, : pl[i]].tolist(), [1] * pl[i], list(range(pl[i])), []
        for g in range(groups):
            suffix = ids[g * b + i, pl[i] : lens[g * b + i]].tolist()
            row += suffix
            seg += [g + 2] * len(suffix)
            posn += range(pl[i], pl[i] + len(suffix))
            ends.append(len(row) - 1)
        rows.append(row), segs.append(seg), pos.append(posn), last.append(ends)
    out_ids, _ = pad_sequences(rows, pad_id)
    seg_ids, _ = pad_sequences(segs, 0)  # 0: padding, 1: the prompt, g + 2: response g
    pos_ids, _ = pad_sequences(pos, 0)
    attend = segment_attention(seg_ids, shared=1)
    dev = ids.device
    return out_ids.to(dev), attend.to(dev), pos_ids.to(dev), torch.tensor(last, device=dev)


def split_shared_prompt(ids: Tensor, mask: Tensor, prompt_len: Tensor, pad_id: int, groups: int = 2):
    """Rows that share a prompt in groups (row ``g * B + b`` is response g to prompt b, its first
    ``prompt_len[b]`` tokens the prompt) -> the prompts once, left-padded, ``(B, P)`` ids and mask, and
    the responses, right-padded, ``(B * groups, S)`` ids and mask in interleaved order
    (b0g0, b0g1, ..., b1g0, ...), the order of a KV cache repeated with ``repeat_interleave``."""
    b = prompt_len.numel()
    lens, pl = mask.sum(1).tolist(), prompt_len.tolist()
    prompts = [ids[i, : pl[i]].tolist() for i in range(b)]
    suffixes = [ids[g * b + i, pl[i] : lens[g * b + i]].tolist() for i in range(b) for g in range(groups)]
    p_ids, p_mask = pad_sequences(prompts, pad_id, side="left")
    s_ids, s_mask = pad_sequences(suffixes, pad_id, side="right")
    return p_ids.to(ids.device), p_mask.to(ids.device), s_ids.to(ids.device), s_mask.to(ids.device)
