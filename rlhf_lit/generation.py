"""Sampling from a causal LM for evaluation, PPO rollouts and chat, with stop handling done once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlhf_lit.ops import pad_sequences



@dataclass
class GenerationConfig:
    """Sampling settings (Hugging Face ``generate``)."""

    max_new_tokens: int = 64
    """longest response in tokens"""
    do_sample: bool = True
    """sample (True) or greedy (False)"""
    temperature: float = 1.0
    top_k: int = 0
    """0 disables top-k"""
    top_p: float = 1.0
    stop_token: Optional[str] = None
    """an extra token text that ends a response, besides eos"""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid generation settings {self}")


def stop_ids(tokenizer, cfg: GenerationConfig) -> list[int]:
    ids = [tokenizer.eos_token_id]
    if cfg.stop_token:
        tok = tokenizer.convert_tokens_to_ids(cfg.stop_token)
        if tok is None or tok == tokenizer.unk_token_id:
            raise ValueError(f"stop_token {cfg.stop_token!r} is not a single token of the tokenizer")
        ids.append(tok)
    return ids


def response_mask(responses: Tensor, stops: list[int]) -> Tensor:
    """1 up to and including the first stop token of each row, 0 after it. (B, T) -> (B, T) long."""
    is_stop = torch.isin(responses, torch.tensor(stops, device=responses.device))
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    return (~after).long()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, cfg: GenerationConfig,
             synced_gpus: bool = False) -> tuple[Tensor, Tensor]:
    """Sample responses to left-padded prompts with the KV cache.

    prompt_ids, prompt_mask: (B, P). Returns (responses, mask), both (B, R): tokens after a stop
    token are replaced by pad and masked out, so every row ends at its first eos/stop.
    """
    stops = stop_ids(tokenizer, cfg)
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=stops, use_cache=True, synced_gpus=synced_gpus)
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)
    finally:
        model.train(was_training)
    responses = out[:, prompt_ids.size(1):]
    if responses.size(1) == 0:
        responses = torch.full((prompt_ids.size(0), 1), tokenizer.pad_token_id, device=prompt_ids.device)
    mask = response_mask(responses, stops)
    return responses.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def decode(tokenizer, responses: Tensor, mask: Tensor) -> list[str]:
    """Response texts without the stop token."""
    eos = {tokenizer.eos_token_id}
    return [tokenizer.decode([t for t, m in zip(r.tolist(), k.tolist()) if m and t not in eos])
            for r, k in zip(responses, mask)]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], cfg: GenerationConfig, batch_size: int = 32,
                   max_prompt_len: Optional[int] = None, device=None) -> tuple[list[str], list[tuple]]:
    """Responses to prompt texts, in batches (prompts left-padded and cut from the left to
    ``max_prompt_len`` tokens). Returns the texts and, per batch, (ids, mask, prompt_len, response_mask)
    with ids/mask (B, P + R) for scoring the sequences afterwards."""
    texts, batches = [], []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i : i + batch_size], add_special_tokens=False)["input_ids"]
        ids, mask = pad_sequences([x[-max_prompt_len:] if max_prompt_len else x for x in ids], tokenizer.pad_token_id,
                                  side="left")
        ids, mask = ids.to(device or ids.device), mask.to(device or ids.device)
        out, out_mask = generate(model, tokenizer, ids, mask, cfg)
        texts += decode(tokenizer, out, out_mask)
        batches.append((torch.cat([ids, out], 1), torch.cat([mask, out_mask], 1), ids.size(1), out_mask.float()))
    return texts, batches
