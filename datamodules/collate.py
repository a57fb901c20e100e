"""Token encoding and padding for the three stages. Pure torch + a tokenizer: no lightning.

Encoders return token-id lists (never max-length padded tensors); collate functions pad per batch.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from rlhf_lit.ops import pad_sequences as pad


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_sft(tok, records: list[dict], max_len: int, mask_prompt: bool = True) -> tuple[list[dict], Counter]:
    """prompt + response + eos, right-truncated to ``max_len``; ``loss_mask`` is 0 on prompt tokens
    when ``mask_prompt`` (InstructGPT) and 1 everywhere when not (DeepSpeed-Chat trains on the whole text).
    Records with no response token left after truncation are dropped and counted."""
    out, dropped = [], Counter()
    prompts, responses = _ids(tok, [r["prompt"] for r in records]), _ids(tok, [r["response"] for r in records])
    for p, r in zip(prompts, responses):
        ids = (p + r + [tok.eos_token_id])[:max_len]
        n_resp = len(ids) - len(p)
        if n_resp <= 0:
            dropped["prompt_fills_max_seq_len"] += 1
            continue
        loss_mask = ([0] * len(p) if mask_prompt else [1] * len(p)) + [1] * n_resp
        out.append({"input_ids": ids, "loss_mask": loss_mask})
    return out, dropped


def collate_sft(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    ids, mask = pad([x["input_ids"] for x in items], pad_id)
    loss_mask, _ = pad([x["loss_mask"] for x in items], 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask * mask}


def encode_pairs(tok, records: list[dict], max_len: int) -> tuple[list[dict], Counter]:
    """prompt + chosen/rejected + eos. Over-long pairs lose prompt tokens from the left so the responses
    survive; a pair whose longer response alone fills ``max_len`` is dropped and counted."""
    out, dropped = [], Counter()
    prompts = _ids(tok, [r["prompt"] for r in records])
    chosen = _ids(tok, [r["chosen"] for r in records])
    rejected = _ids(tok, [r["rejected"] for r in records])
    for rec, p, c, r in zip(records, prompts, chosen, rejected):
        c, r = c + [tok.eos_token_id], r + [tok.eos_token_id]
        keep = max_len - max(len(c), len(r))
        if keep < 1:
            dropped["response_fills_max_seq_len"] += 1
            continue
        p = p[-keep:]
        item = {"chosen_ids": p + c, "rejected_ids": p + r, "prompt_len": len(p)}
        if "margin" in rec:
            item["margin"] = float(rec["margin"])
        out.append(item)
    return out, dropped


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows first, then rejected, in one (2B, T) batch so one forward scores both."""
    ids, mask = pad([x["chosen_ids"] for x in items] + [x["rejected_ids"] for x in items], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if all("margin" in x for x in items):
        batch["margin"] = torch.tensor([x["margin"] for x in items])
    return batch


def encode_prompts(tok, records: list[dict], max_len: int) -> tuple[list[dict], Counter]:
    """Prompt ids, truncated from the left (the end holds the turn the model must answer)."""
    out, dropped = [], Counter()
    for rec, p in zip(records, _ids(tok, [r["prompt"] for r in records])):
        if not p:
            dropped["empty_prompt"] += 1
            continue
        out.append({"prompt_ids": p[-max_len:], "prompt": rec["prompt"]})
    return out, dropped


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Left-padded prompts for generation: prompt_ids, prompt_mask (B, T) and the prompt texts."""
    ids, mask = pad([x["prompt_ids"] for x in items], pad_id, side="left")
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt": [x["prompt"] for x in items]}
