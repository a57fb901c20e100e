"""Attention in fp32 for bf16/fp16 inputs on CPU: transformers' sdpa attention with the inputs upcast.

On CPU, PyTorch's scaled-dot-product attention in bf16 has a slow backward and rounds the attention
itself to bf16. Measured on this project's 2-core EPYC with avx512_bf16, one thread, (8, 9, 140, 64) with a
mask, the shape of a SmolLM2 reward batch: forward + backward 42 ms per layer in bf16, 23 ms in fp32. Over
SmolLM2's 30 layers a bf16-mixed reward step (8 pairs) ran 6.07 s with transformers' sdpa and 5.45-5.57 s
with this, and its scores moved from [0.652, 0.473] to [0.586, 0.455] against [0.583, 0.447] in fp32 (#30).
The linear layers, most of the FLOPs, stay in bf16. On CUDA the flash kernels compute in bf16 at full speed:
there the inputs pass through unchanged. ``RLHF_LIT_FP32_CPU_ATTENTION`` forces either branch on any
machine (``1``: upcast on every device, ``0``: never; default ``auto``: on CPU).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlhf_lit.hf.models.precision import autocast_dtype, hardware_switch

NAME = "rlhf_lit_sdpa"
FP32_ATTENTION_ENV = "RLHF_LIT_FP32_CPU_ATTENTION"
SEGMENTS = "rlhf_lit_segments"
"""the forward keyword that carries a padding-free row's sequence lengths to the attention (forward.backbone_hidden)"""
_LOW = (torch.bfloat16, torch.float16)


def upcast_attention(device: torch.device) -> bool:
    """Whether attention on ``device`` runs in fp32 when its inputs are bf16/fp16: on CPU, or what
    ``RLHF_LIT_FP32_CPU_ATTENTION`` forces. A bad value is a one-line error naming the variable."""
    forced = hardware_switch(FP32_ATTENTION_ENV)
    return device.type == "cpu" if forced is None else forced


def sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention function (same arguments and returns), run in fp32 where
    :func:`upcast_attention` says so and it would otherwise compute in half precision (under autocast, or on
    half inputs); the output is in that half dtype, as sdpa's would be.
    query, key, value: (B, heads, T, head_dim); attention_mask: (B, 1, T, S) bool or additive, or None."""
    # The dtype sdpa would compute in: autocast's where it is on (it casts sdpa's inputs; transformers 5.19
    # hands llama's attention fp32 inputs under autocast, 5.25 bf16 values beside fp32 rotary queries and
    # keys), else the values'.
    device = value.device.type
    half = autocast_dtype(device) or value.dtype
    lengths = kwargs.pop(SEGMENTS, None)
    attend = sdpa_attention_forward if lengths is None else functools.partial(_per_sequence, lengths=lengths)
    if half not in _LOW or not upcast_attention(value.device):
        return attend(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(device, enabled=False):
        out, weights = attend(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(half), weights


def _per_sequence(module, query, key, value, attention_mask, lengths: list[int], **kwargs):
    """Causal attention within each sequence of a padding-free row: query, key, value (1, heads, N, D)
    hold the sequences one after another, ``lengths`` their lengths (summing to N). One sdpa call
    per sequence: the FLOPs of the sequences alone, where one (N, N) block-diagonal mask would cost N^2
    (the padding-free forward's reason to exist, #30). The row's mask is ignored. Returns (1, N, heads, D)."""
    outs, start = [], 0
    for n in lengths:
        end = start + n
        part = (t[:, :, start:end] for t in (query, key, value))
        outs.append(sdpa_attention_forward(module, *part, None, **kwargs)[0])
        start = end
    return torch.cat(outs, 1), None


def register() -> None:
    """Make ``NAME`` a transformers attention implementation (sdpa's masks); idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, sdpa_fp32_on_cpu)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fp32_cpu_attention(model: nn.Module) -> nn.Module:
    """Switch a model that runs transformers' sdpa attention to :func:`sdpa_fp32_on_cpu`; any other
    implementation (eager, flash, a family without the attention interface) stays as it is. Saved
    configs still name ``sdpa`` (transformers does not write the implementation to config.json)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not getattr(model, "_supports_attention_backend", False):
        return model
    register()
    model.set_attn_implementation(NAME)
    return model
