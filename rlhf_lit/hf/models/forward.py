"""Forward-signature introspection (which arguments a family takes), the hidden states and LM head of a
causal LM, and next-token log-probs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.hf.models.attention import NAME as ATTENTION_NAME
from rlhf_lit.hf.models.attention import SEGMENTS
from rlhf_lit.hf.models.precision import hardware_switch
from rlhf_lit.math.ops import chunked_logprobs, position_ids_from_mask


def accepts_arg(model: nn.Module, name: str) -> bool:
    """Whether the model's forward (a peft model's base model's) takes keyword ``name``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in _forward_params(type(base))


@functools.cache
def _forward_params(cls: type) -> frozenset:
    # Once per model class: this runs in every forward (lm_inputs) and in the generation loop.
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_arg(model: nn.Module, cache) -> dict:
    """The KV-cache keyword of the model's forward: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    return {"cache" if accepts_arg(model, "cache") else "past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


# Families whose attention honours a custom 4D mask with explicit position_ids (packed SFT rows, a reward
# pair's prompt shared by both responses; checked in tests/test_perf_options.py). BLOOM (ALiBi from the 2D
# mask), GPT-J, GPT-Neo and CodeGen do not.
FOUR_D_MASK_FAMILIES = ("opt", "gpt2", "gpt_neox", "llama")
# Attention implementations that read a bool 4D mask as such: eager adds it to the scores as numbers
# (silently wrong results) and the flash kernels take none.
_BOOL_MASK_ATTENTION = ("sdpa", ATTENTION_NAME)


def takes_4d_mask(model: nn.Module) -> bool:
    """Whether ``model`` (a peft model, a backbone or a causal LM) is of a family in FOUR_D_MASK_FAMILIES
    and runs sdpa attention (transformers' or rlhf-lit's fp32 one on CPU)."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in FOUR_D_MASK_FAMILIES
        and getattr(config, "_attn_implementation", None) in _BOOL_MASK_ATTENTION
    )


def lm_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict:
    """Forward keywords with explicit ``position_ids`` where the family takes them (left padding safe)."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_arg(model, "position_ids"):
        kw["position_ids"] = position_ids_from_mask(attention_mask)
    return kw


PADDING_FREE_ENV = "RLHF_LIT_PADDING_FREE"
# Families whose positions come from position_ids and whose attention receives the forward's keywords, so a
# padding-free row gives the padded rows' hidden states (each checked in tests/test_perf_options.py). BLOOM
# (ALiBi from the 2D mask), GPT-Neo and Gemma 2 run eager attention, not rlhf-lit's.
PADDING_FREE_FAMILIES = ("opt", "gpt2", "gpt_neox", "gptj", "codegen", "llama", "qwen2", "mistral", "gemma", "phi3")


def padding_free(backbone: nn.Module, inputs: dict) -> bool:
    """Whether :func:`backbone_hidden` runs ``inputs`` as one padding-free row: a family of
    PADDING_FREE_FAMILIES under rlhf-lit's attention (which attends within each sequence), exactly the
    keywords of :func:`lm_inputs` with a 2D mask with padding in it, no sliding window shorter than the
    rows. ``RLHF_LIT_PADDING_FREE``: ``auto`` (default) on CPU, ``1`` on any device, ``0`` never."""
    mask, config = inputs.get("attention_mask"), getattr(backbone, "config", None)
    if mask is None or mask.dim() != 2 or set(inputs) != {"input_ids", "attention_mask", "position_ids"}:
        return False
    if getattr(config, "model_type", None) not in PADDING_FREE_FAMILIES:
        return False
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        return False
    window = getattr(config, "sliding_window", None)  # the per-sequence attention applies no window
    if isinstance(window, int) and window < mask.size(1):
        return False
    forced = hardware_switch(PADDING_FREE_ENV)
    on = mask.device.type == "cpu" if forced is None else forced
    return on and not bool(mask.all())


def backbone_hidden(backbone: nn.Module, **inputs) -> Tensor:
    """The backbone's last hidden states (B, T, H) for forward keywords ``inputs`` (input_ids, attention_mask
    and position_ids (B, T), as :func:`lm_inputs` gives them). Where :func:`padding_free` allows, the
    attended tokens run as one row of N = mask.sum() tokens, each sequence attending within itself, and
    come back to their (B, T) places (zeros at padding): the padded rows' results for the FLOPs of the
    real tokens. A PPO rollout of SmolLM2 is ~26% padding (left-padded prompts, right-padded responses)."""
    if not padding_free(backbone, inputs):
        return backbone(**inputs, use_cache=False).last_hidden_state
    keep = inputs["attention_mask"].bool()
    where = keep.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    lengths = [n for n in keep.sum(1).tolist() if n]
    pos = inputs["position_ids"][where].unsqueeze(0)
    # An all-ones mask: transformers builds no (N, N) mask (nor reads the restarting positions as packing)
    out = backbone(
        input_ids=inputs["input_ids"][where].unsqueeze(0),
        attention_mask=torch.ones_like(pos),
        position_ids=pos,
        use_cache=False,
        **{SEGMENTS: lengths},
    )
    hidden = out.last_hidden_state[0]
    return hidden.new_zeros(*keep.shape, hidden.size(-1)).index_put(where, hidden)


# Config fields by which a family's causal-LM forward changes the logits after the LM head (Gemma 2's
# soft-capping, Cohere's logit_scale, Granite's logits_scaling). Kept beside the probe below because a
# soft-cap is invisible on small logits (tanh(x/30)*30 ~ x): a random tiny model would pass the probe.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


_PLAIN_HEAD = "_rlhf_lit_plain_head"  # the probe's verdict, kept on the base model


@torch.no_grad()
def _head_gives_the_logits(base: nn.Module, head: nn.Module) -> bool:
    """Whether ``head(last hidden state)`` equals the model's own logits on a few tokens, in eval mode. A
    family that transforms logits after the head under a name nobody listed (Falcon-H1's
    ``lm_head_multiplier``, 0.039 in published configs: log-probs 0.33 nats off, audit #27) fails it."""
    modes = [(m, m.training) for m in base.modules()]
    base.eval()
    try:
        vocab = base.get_input_embeddings().num_embeddings
        ids = (torch.arange(1, 9, device=head.weight.device) % vocab).unsqueeze(0)
        kw = lm_inputs(base, ids, torch.ones_like(ids))
        logits = base(**kw, use_cache=False).logits.float()
        mine = head(base.base_model(**kw, use_cache=False).last_hidden_state).float()
        return mine.shape == logits.shape and torch.allclose(mine, logits, rtol=1e-3, atol=1e-5)
    finally:
        for m, training in modes:
            m.training = training


def lm_hidden(model: nn.Module, **inputs) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The last hidden states of a causal LM (B, T, H) and its LM head, so callers apply the head on the
    positions they need, in chunks (:func:`rlhf_lit.math.ops.chunked_logprobs`): a (B, T, V) logits tensor is
    never made. ``head(lm_hidden(...)[0])`` equals ``model(...).logits`` (tested for every tiny family).
    A peft model's adapters stay in the path (it wraps the same modules). Families whose forward
    transforms the logits after the head give (logits, identity) instead: same results, more memory. Which
    ones is read from the config's known fields and, for any other family, checked once per model by
    :func:`_head_gives_the_logits` at its first call."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, cfg = base.get_output_embeddings(), base.config
    plain = getattr(base, _PLAIN_HEAD, None)
    if plain is None:
        plain = isinstance(head, nn.Linear) and not any(
            getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS
        )
        plain = plain and _head_gives_the_logits(base, head)
        object.__setattr__(base, _PLAIN_HEAD, plain)
    if not plain:
        return model(**inputs, use_cache=False).logits, nn.Identity()
    return backbone_hidden(base.base_model, **inputs), head


def next_token_logprobs(model: nn.Module, target_mask: Optional[Tensor] = None, **inputs) -> Tensor:
    """Log-prob of each next token, (B, T - 1): entry t is token t+1 predicted at position t. ``inputs``:
    the forward's keywords, ``input_ids`` (B, T) among them; computed in LM-head chunks.

    ``target_mask`` (B, T), read on the target side like a loss mask: the LM head runs only at the positions
    that predict a token where it is 1, the others get 0. A loss that masks prompt and padding (SFT,
    pretraining mix) pays for the head only where it reads it: at SmolLM2's 49,152-token vocabulary the
    head is a fifth of the model's FLOPs, and half of an HH batch's positions are prompt or padding (#30)."""
    hidden, head = lm_hidden(model, **inputs)
    targets = inputs["input_ids"][:, 1:]
    if target_mask is None:
        return chunked_logprobs(hidden[:, :-1], head, targets)[0]
    keep = target_mask[:, 1:].bool()
    picked = chunked_logprobs(hidden[:, :-1][keep].unsqueeze(0), head, targets[keep].unsqueeze(0))[0][0]
    return picked.new_zeros(keep.shape).masked_scatter(keep, picked)


def response_logps(model, input_ids, attention_mask, prompt_len):
    """Summed log-probs of the response tokens and their count. input_ids, attention_mask: (2B, T), the B
    chosen rows then the B rejected ones; prompt_len: (B,). Returns two (2B,) tensors."""
    pos = torch.arange(input_ids.size(1), device=input_ids.device)
    response = (pos[None] >= prompt_len.repeat(2)[:, None]) & attention_mask.bool()  # (2B, T), target side
    response[:, 0] = False
    lp = next_token_logprobs(model, response, **lm_inputs(model, input_ids, attention_mask))
    return lp.sum(-1), response.sum(-1)
