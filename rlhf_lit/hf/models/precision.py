"""Frozen models held in bf16/fp16 (half of fp32's memory) and computed in fp32 layer by layer where the
hardware has no native half-precision units (``RLHF_LIT_NATIVE_BF16`` forces either branch)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FROZEN_DTYPES = ("bfloat16", "float16", "float32")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in on ``device_type`` ('cpu', 'cuda'), None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def check_frozen_dtype(dtype: str) -> str:
    """``dtype`` if it is a storage dtype for frozen models, else a one-line error naming the key."""
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {dtype!r}")
    return dtype


NATIVE_BF16_ENV = "RLHF_LIT_NATIVE_BF16"


"""``auto`` (default: detect), ``1`` (treat this CPU as computing bf16 natively) or ``0`` (as emulating it):
the switch that lets tests and benchmarks take either hardware branch on any machine (#26)"""


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (avx512_bf16 or AMX), or what
    ``RLHF_LIT_NATIVE_BF16`` forces. A bad value is a one-line error naming the variable."""
    forced = hardware_switch(NATIVE_BF16_ENV)
    if forced is not None:
        return forced
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def hardware_switch(name: str) -> Optional[bool]:
    """An environment switch that forces a hardware branch: ``1`` True, ``0`` False, ``auto`` (or unset)
    None, meaning detect. A bad value is a one-line error naming the variable."""
    mode = os.environ.get(name, "auto").strip().lower() or "auto"
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    if mode != "auto":
        raise ValueError(f"{name} must be auto, 1 or 0, got {mode!r}")
    return None


def native_half(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices at full speed: CUDA (bf16 where supported), or a
    CPU with avx512_bf16 / AMX for bf16 (:func:`cpu_bf16_native`, forced by ``RLHF_LIT_NATIVE_BF16``). On
    this project's AVX2-only EPYC, one thread, 1024^2: a bf16 ``F.linear`` ran at 9.2 GFLOP/s against 66.7
    in fp32 (a bf16 ``a @ b`` at 0.86), and a SmolLM2 forward+backward took 14.5x longer under bf16
    autocast. It decides speed only (which benchmark rows run, vLLM's ``dtype: auto``), never what a
    model computes: frozen models follow the trainer's precision (:func:`hold_frozen`)."""
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu" and dtype == torch.bfloat16:
        return cpu_bf16_native()
    return False


def _upcast(module: nn.Module, args: tuple, kwargs: dict):
    params = list(module.parameters(recurse=False))
    if not params or params[0].dtype == torch.float32 or getattr(module, "_compute_held", False):
        return None
    if isinstance(module, nn.Linear) and autocast_dtype(params[0].device.type) == params[0].dtype:
        # autocast rounds the fp32 copy and the inputs back to the held dtype for the matmul: the held
        # weights give the same bits without two copies of every weight per forward (#30)
        return None
    module._held_half = [p.data for p in params]
    for p in params:
        p.data = p.data.float()
    cast = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _restore(module: nn.Module, args: tuple, kwargs: dict, output):
    held = module.__dict__.pop("_held_half", None)
    if held is not None:
        for p, data in zip(module.parameters(recurse=False), held):
            p.data = data


def hold_frozen(module: nn.Module, dtype: str, compute_held: bool = False) -> nn.Module:
    """Store a frozen module's floating parameters in ``dtype`` (half the memory of fp32 for the
    reference and reward models; issue #18) and make it compute in the trainer's precision (#27).

    ``compute_held=False`` (fp32 and mixed-precision trainers): every layer upcasts its own weights and
    inputs to fp32 for its forward and drops the copy after it, so peak extra memory is one layer's weights
    and the result equals an fp32 model with the rounded weights (tested) on every machine, whether or
    not it has bf16 units. Under bf16 autocast the upcast layer then runs as the trainable model does
    (autocast rounds the fp32 weights to bf16 for matmuls, the rest stays fp32), so a reference equal to
    the policy gives KL 0 at step 0. Computing natively in bf16 instead put SmolLM2's reference 0.036
    nats per token off the fp32 policy on a CPU with avx512_bf16 (issue #27: DPO step-0 loss 0.6974, not
    log 2). ``compute_held=True`` (a bf16-true/16-true trainer, where the policy itself computes in half):
    the module runs in ``dtype``. Buffers (rotary tables) keep their dtype. Not for trainable modules
    (their fp32 weights are the optimizer's) nor under DeepSpeed, whose own precision setting casts every
    module it holds."""
    check_frozen_dtype(dtype)
    for sub in module.modules():
        sub._compute_held = compute_held
    if dtype == "float32" or getattr(module, "_held_dtype", None) == dtype:
        return module
    target = DTYPES[dtype]
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        if not params:
            continue
        for p in params:
            if p.is_floating_point():
                p.data = p.data.to(target)
        if not getattr(sub, "_upcast_hooks", False):
            sub.register_forward_pre_hook(_upcast, with_kwargs=True)
            sub.register_forward_hook(_restore, with_kwargs=True, always_call=True)
            sub._upcast_hooks = True
    module._held_dtype = dtype
    return module
