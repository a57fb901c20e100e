"""Token encoding and padding for the three stages. Pure torch + a tokenizer: no lightning.

Encoders return token-id lists (never max-length padded tensors); collate functions pad per batch.
Conversations are rendered by :class:`rlhf_lit.hf.chat_format.ChatFormat`: the tokenizer's chat template
when it has one (BOS by the template, replies closed by its end-of-turn token), the HH text otherwise.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from rlhf_lit.hf.chat_format import ChatFormat, to_messages
from rlhf_lit.math.ops import pad_sequences as pad
from rlhf_lit.math.ops import segment_attention


def prompt_of(record: dict):
    """What a record's prompt is rendered from: its messages when the source kept them, else its text."""
    return record.get("messages") or record["prompt"]


def encode_sft(
    tok, records: list[dict], max_len: int, mask_prompt: bool = True, all_assistant_turns: bool = False
) -> tuple[list[dict], Counter]:
    """prompt + response + end-of-turn (eos in HH mode), right-truncated to ``max_len``; ``loss_mask`` is 0
    on prompt tokens when ``mask_prompt`` (InstructGPT) and 1 everywhere when not (DeepSpeed-Chat trains
    on the whole text). ``all_assistant_turns``: the loss covers every assistant turn of a multi-turn
    conversation, not only the final reply. Records with no response token left after truncation are
    dropped and counted."""
    out, dropped = [], Counter()
    fmt = ChatFormat(tok)
    if all_assistant_turns:
        convs = [
            fmt.conversation_ids(to_messages(prompt_of(r)) + [{"role": "assistant", "content": r["response"]}])
            for r in records
        ]
        seqs = [(ids, m if mask_prompt else [1] * len(ids)) for ids, m in convs]
    else:
        prompts, responses = (
            fmt.prompt_ids([prompt_of(r) for r in records]),
            fmt.response_ids([r["response"] for r in records]),
        )
        seqs = [
            (p + r, ([0] * len(p) if mask_prompt else [1] * len(p)) + [1] * len(r)) for p, r in zip(prompts, responses)
        ]
    for ids, loss_mask in seqs:
        ids, loss_mask = ids[:max_len], loss_mask[:max_len]
        if not any(loss_mask):
            dropped["prompt_fills_max_seq_len"] += 1
            continue
        out.append({"input_ids": ids, "loss_mask": loss_mask})
    return out, dropped


def collate_sft(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    ids, mask = pad([x["input_ids"] for x in items], pad_id)
    loss_mask, _ = pad([x["loss_mask"] for x in items], 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask * mask}


def pack_sft(items: list[dict], max_len: int, seed: int = 0) -> list[dict]:
    """Several encoded SFT examples per row, up to ``max_len`` tokens (first fit, in a seeded shuffled
    order). Each row keeps its examples apart: ``segments`` numbers them (attention stays inside one
    example) and ``position_ids`` restart at 0. The first token of each example is never a target
    (its loss_mask is 0): it would otherwise be predicted from the previous example."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[dict]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        j = next((k for k, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([]), room.append(max_len)
            j = len(rows) - 1
        rows[j].append(items[i])
        room[j] -= n
    out = []
    for row in rows:
        out.append(
            {
                "input_ids": [t for x in row for t in x["input_ids"]],
                "loss_mask": [m if k else 0 for x in row for k, m in enumerate(x["loss_mask"])],
                "position_ids": [k for x in row for k in range(len(x["input_ids"]))],
                "segments": [s + 1 for s, x in enumerate(row) for _ in x["input_ids"]],
            }
        )
    return out


def collate_packed(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Packed rows (see pack_sft): ids, loss_mask, position_ids, the 2D padding mask (B, T) and a
    block-diagonal causal mask ``attention_mask_4d`` (B, 1, T, T): True where a token may attend."""
    batch = collate_sft(items, pad_id)
    batch["position_ids"], _ = pad([x["position_ids"] for x in items], 0)
    seg, _ = pad([x["segments"] for x in items], 0)  # 0 = padding
    batch["attention_mask_4d"] = segment_attention(seg)
    return batch


def encode_pairs(tok, records: list[dict], max_len: int) -> tuple[list[dict], Counter]:
    """prompt + chosen/rejected + end-of-turn. Over-long pairs lose prompt tokens from the left so the
    responses survive; a pair whose longer response alone fills ``max_len`` is dropped and counted."""
    out, dropped = [], Counter()
    fmt = ChatFormat(tok)
    prompts = fmt.prompt_ids([prompt_of(r) for r in records])
    chosen = fmt.response_ids([r["chosen"] for r in records])
    rejected = fmt.response_ids([r["rejected"] for r in records])
    for rec, p, c, r in zip(records, prompts, chosen, rejected):
        keep = max_len - max(len(c), len(r))
        if keep < 1:
            dropped["response_fills_max_seq_len"] += 1
            continue
        p = p[-keep:]
        # index: the pair's position among the kept ones (DPO caches reference log-probs by it)
        item = {"chosen_ids": p + c, "rejected_ids": p + r, "prompt_len": len(p), "index": len(out)}
        if "margin" in rec:
            item["margin"] = float(rec["margin"])
        out.append(item)
    return out, dropped


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows first, then rejected, in one (2B, T) batch so one forward scores both; ``prompt_len``
    (B,) lets the reward model run each shared prompt once (rlhf_lit.math.ops.pack_shared_prompt)."""
    ids, mask = pad([x["chosen_ids"] for x in items] + [x["rejected_ids"] for x in items], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt_len": torch.tensor([x["prompt_len"] for x in items])}
    if all("index" in x for x in items):
        batch["index"] = torch.tensor([x["index"] for x in items])
    if all("margin" in x for x in items):
        batch["margin"] = torch.tensor([x["margin"] for x in items])
    return batch


def encode_prompts(tok, records: list[dict], max_len: int) -> tuple[list[dict], Counter]:
    """Prompt ids, truncated from the left (the end holds the turn the model must answer); each item's
    ``cut`` says whether its prompt was (the datamodule counts them)."""
    out, dropped = [], Counter()
    for rec, p in zip(records, ChatFormat(tok).prompt_ids([prompt_of(r) for r in records])):
        if not p:
            dropped["empty_prompt"] += 1
            continue
        item = {"prompt_ids": p[-max_len:], "prompt": rec["prompt"], "columns": rec.get("columns") or {}}
        out.append({**item, "cut": len(p) > max_len})
    return out, dropped


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Left-padded prompts for generation: prompt_ids, prompt_mask (B, T), the prompt texts and the rows'
    extra columns, ``{name: [value per row]}`` (None where a row lacks one)."""
    ids, mask = pad([x["prompt_ids"] for x in items], pad_id, side="left")
    names = sorted({k for x in items for k in x.get("columns", {})})
    columns = {k: [x.get("columns", {}).get(k) for x in items] for k in names}
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt": [x["prompt"] for x in items], "columns": columns}
