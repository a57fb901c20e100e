"""Sampling from a causal LM for evaluation, PPO rollouts and chat, with stop handling done once."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.hf.chat_format import ChatFormat, Prompt
from rlhf_lit.hf.models import accepts_arg, autocast_dtype, cache_arg, returned_cache
from rlhf_lit.math.ops import pad_sequences, position_ids_from_mask
from rlhf_lit.rl.vllm_engine import VLLMOptions

ENGINES = ("kv_loop", "compiled", "hf", "vllm")
STATIC_CACHE_ROUND = 64
"""static KV caches are sized prompt + max_new_tokens rounded up to this, so batches with different prompt
lengths share one compiled decode step"""


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
    engine: str = "kv_loop"
    """'kv_loop': rlhf-lit's KV-cache sampling loop (1.5-2x faster than Hugging Face ``generate`` on small
    models, see benchmarks/); 'compiled': the same loop on a static KV cache with the decode step compiled
    by ``torch.compile`` (once per model class and batch size: tens of seconds on a CPU, then faster steps: see
    benchmarks/README.md; worth it for long runs); 'hf': ``model.generate`` (needed for ``synced_gpus``);
    'vllm': a colocated vLLM engine, weights synced after every training step (``make vllm``; issue #25)"""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    """the vLLM engine's settings (engine: vllm)"""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid generation settings {self}")
        if self.engine not in ENGINES:
            raise ValueError(f"generation engine must be one of {ENGINES}, got {self.engine!r}")


def stop_ids(tokenizer, cfg: GenerationConfig) -> list[int]:
    """eos, the chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``...) and ``stop_token``."""
    ids = ChatFormat(tokenizer).stop_ids
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


def generate(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, cfg: GenerationConfig, **kw):
    """Sample responses to left-padded prompts with the KV cache (or the vLLM ``engine=``; ``synced_gpus=``).

    prompt_ids, prompt_mask: (B, P). Returns (responses, mask), both (B, R): tokens after a stop
    token are replaced by pad and masked out, so every row ends at its first eos/stop.
    """
    return sample(model, tokenizer, prompt_ids, prompt_mask, cfg, **kw)[:2]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: GenerationConfig,
    synced_gpus: bool = False,
    engine=None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """:func:`generate`, plus the sampler's own log-probs of the response tokens, (B, R), where the
    sampler is a separate engine (vLLM: its numerics differ from the trainer's); else None. With
    ``cfg.engine == 'vllm'`` and no ``engine`` given, one is built for ``model`` and kept with it
    (evaluate, chat: the weights do not change)."""
    stops = stop_ids(tokenizer, cfg)
    engine_logprobs = None
    if cfg.engine == "vllm":
        engine = engine or attached_engine(model, tokenizer, cfg)
        responses, engine_logprobs = engine.generate(prompt_ids, prompt_mask, cfg, stops, tokenizer.pad_token_id)
    else:
        was_training = model.training
        model.eval()
        try:
            if cfg.engine in ("kv_loop", "compiled") and not synced_gpus:
                compiled = cfg.engine == "compiled"
                # clone(): out of inference mode, so the tokens can feed a training forward (PPO)
                responses = kv_loop(
                    model, prompt_ids, prompt_mask, cfg, stops, tokenizer.pad_token_id, compiled
                ).clone()
            else:
                responses = hf_generate(model, prompt_ids, prompt_mask, cfg, stops, tokenizer.pad_token_id, synced_gpus)
        finally:
            model.train(was_training)
    if responses.size(1) == 0:
        responses = torch.full((prompt_ids.size(0), 1), tokenizer.pad_token_id, device=prompt_ids.device)
    mask = response_mask(responses, stops)
    if engine_logprobs is not None:
        engine_logprobs = engine_logprobs * mask
    return responses.masked_fill(mask == 0, tokenizer.pad_token_id), mask, engine_logprobs


def attached_engine(model, tokenizer, cfg: GenerationConfig):
    """The vLLM engine kept with ``model`` (built on first use from its current weights)."""
    from rlhf_lit.rl.vllm_engine import VLLMEngine

    engine = model.__dict__.get("_vllm_engine")
    if engine is None:
        engine = VLLMEngine.from_model(model, tokenizer, cfg.vllm, seed=torch.initial_seed() % 2**31)
        model.__dict__["_vllm_engine"] = engine
    return engine


def hf_generate(model, prompt_ids, prompt_mask, cfg: GenerationConfig, stops, pad_id, synced_gpus=False) -> Tensor:
    """Hugging Face ``generate``; returns the new tokens (B, R)."""
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        pad_token_id=pad_id,
        eos_token_id=stops,
        use_cache=True,
        synced_gpus=synced_gpus,
    )
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)[:, prompt_ids.size(1) :]


@torch.inference_mode()
def kv_loop(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: GenerationConfig,
    stops: list[int],
    pad_id: int,
    compiled: bool = False,
) -> Tensor:
    """Sample with the KV cache, one forward per new token, until every row has stopped.

    What it saves over ``generate`` on small models (measured in benchmarks/): logits of the last
    position only during prefill, one uniform number per row per token instead of ``multinomial``'s
    (inverse-CDF sampling), and no logits-processor / stopping-criteria machinery. ``compiled``: a static
    cache and a compiled decode step (:func:`static_decoding`); the prefill stays eager.
    (B, P) left-padded prompts -> (B, R) new tokens, pad after each row's stop token.
    """
    (b, p), mask = prompt_ids.shape, prompt_mask
    positions = position_ids_from_mask(mask) if accepts_arg(model, "position_ids") else None
    keep = {"logits_to_keep": 1} if accepts_arg(model, "logits_to_keep") else {}
    past, prefill = None, cast_once(model)  # the prefill and every eager decode step share one rounded copy
    decode = prefill
    if compiled:
        past, mask, decode = static_decoding(model, prompt_mask, cfg.max_new_tokens)
    # transformers < 5.24 takes the slots a static cache writes; later ones count them in the cache itself
    slots = compiled and accepts_arg(model, "cache_position")
    step = {"input_ids": prompt_ids, "attention_mask": mask}
    if slots:
        step["cache_position"] = torch.arange(p, device=prompt_ids.device)
    if positions is not None:
        step["position_ids"] = positions
    stop = torch.tensor(stops, device=prompt_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
    out, tokens = None, []
    for i in range(cfg.max_new_tokens):
        out = (decode if i else prefill)(**step, **cache_arg(model, past), use_cache=True, **keep)
        past = returned_cache(out)
        nxt = pick_tokens(out.logits[:, -1], cfg).masked_fill(done, pad_id)
        tokens.append(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        if not compiled:  # a static cache's mask already spans every position
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        step = {"input_ids": nxt.unsqueeze(1), "attention_mask": mask}
        if slots:
            step["cache_position"] = torch.tensor([p + i], device=prompt_ids.device)
        if positions is not None:
            positions = positions[:, -1:] + 1
            step["position_ids"] = positions
    return torch.stack(tokens, 1)


def cast_once(model: nn.Module):
    """``model``'s forward with its linear layers' fp32 weights and biases rounded once to the autocast dtype,
    for the KV loop's forwards under autocast. Autocast caches no casts in inference mode, so every decode
    step would round every weight again: 3.0 s of a 6.5 s SmolLM2 rollout on CPU (issue #30). The copies
    are the bits autocast makes (it rounds each linear's inputs the same way), so the tokens do not change;
    embeddings and norms keep their fp32 weights, as under autocast; the copies (half the fp32 linear
    weights' size: less than the gradients a full fine-tuning step holds, not under LoRA) live for one call
    of :func:`kv_loop`. Without autocast, or with parameters DeepSpeed ZeRO-3 partitions, the model itself."""
    params = list(model.parameters())
    device = params[0].device.type if params else "cpu"
    dtype = autocast_dtype(device)
    if dtype is None or any(hasattr(p, "ds_id") for p in params):
        return model
    casts = {
        f"{name}.{key}" if name else key: p.to(dtype)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for key, p in module.named_parameters(recurse=False)
        if p.dtype == torch.float32
    }
    if not casts:
        return model
    # tie_weights=False: a tied LM head gets its bf16 copy while the embedding it shares keeps fp32
    return lambda **kw: torch.func.functional_call(model, casts, (), kw, tie_weights=False, strict=False)


_COMPILED: dict = {}  # model class -> its compiled forward (a class, not the model: no reference kept to it)


def static_decoding(model, prompt_mask: Tensor, max_new_tokens: int):
    """A static KV cache for (B, P) prompts plus ``max_new_tokens``, its length rounded up to
    ``STATIC_CACHE_ROUND``; the (B, L) attention mask over all of it (ones after the prompt: causality
    hides the slots not yet written); and the model's forward compiled for fixed shapes (once per model
    class; it recompiles only for a new batch size or rounded length). A static cache is what lets
    ``torch.compile`` see one shape per decode step (Hugging Face's recipe for compiled generation)."""
    from transformers import StaticCache

    b, p = prompt_mask.shape
    length = -(-(p + max_new_tokens) // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
    cache = StaticCache(config=model.config, max_cache_len=length)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, length - p)], 1)
    cls = type(model)
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=False)
    return cache, mask, functools.partial(_COMPILED[cls], model)


def pick_tokens(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """Next tokens from last-position logits (B, V) -> (B,): greedy, or sampled at the temperature with
    top-k / top-p filtering (as Hugging Face's warpers: top-k first, then the smallest set of tokens
    whose probability reaches top_p)."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = logits.topk(cfg.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p  # mass before this token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Inverse-CDF sampling: one uniform per row (torch.multinomial draws far more on CPU: ~0.8 ms a call
    # for 8 x 4096 here). u > 0, so tokens of probability 0 are never picked.
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device).clamp_(min=1e-12) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.size(-1) - 1)


def decode(tokenizer, responses: Tensor, mask: Tensor, stops: Optional[list[int]] = None) -> list[str]:
    """Response texts without their stop token (eos, or the given stop ids)."""
    skip = set(stops or [tokenizer.eos_token_id])
    return [
        tokenizer.decode([t for t, m in zip(r.tolist(), k.tolist()) if m and t not in skip])
        for r, k in zip(responses, mask)
    ]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[Prompt],
    cfg: GenerationConfig,
    batch_size: int = 32,
    max_prompt_len: Optional[int] = None,
    device=None,
) -> tuple[list[str], list[tuple]]:
    """Responses to prompts (HH text or message lists, rendered by the tokenizer's chat format), in
    batches (left-padded and cut from the left to ``max_prompt_len`` tokens). Returns the texts and, per
    batch, (ids, mask, prompt_len, response_mask) with ids/mask (B, P + R) for scoring afterwards."""
    texts, batches = [], []
    fmt = ChatFormat(tokenizer)
    stops = stop_ids(tokenizer, cfg)
    for i in range(0, len(prompts), batch_size):
        ids = fmt.prompt_ids(prompts[i : i + batch_size])
        ids, mask = pad_sequences(
            [x[-max_prompt_len:] if max_prompt_len else x for x in ids], tokenizer.pad_token_id, side="left"
        )
        ids, mask = ids.to(device or ids.device), mask.to(device or ids.device)
        out, out_mask = generate(model, tokenizer, ids, mask, cfg)
        texts += decode(tokenizer, out, out_mask, stops)
        batches.append((torch.cat([ids, out], 1), torch.cat([mask, out_mask], 1), ids.size(1), out_mask.float()))
    return texts, batches
