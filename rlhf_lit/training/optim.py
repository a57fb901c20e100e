"""Optimizer parameter groups and learning-rate schedules shared by every stage. Torch only."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY = ("bias", "norm", "ln_", "layernorm", "layer_norm")


def param_groups(module: nn.Module, weight_decay: float, **extra) -> list[dict]:
    """Two groups: weights with ``weight_decay``, biases and norm parameters without (AdamW practice)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, **extra},
        {"params": no_decay, "weight_decay": 0.0, **extra},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class LRSchedule:
    """Linear warmup, then cosine/linear decay or a constant rate, stepped every optimizer step."""

    warmup_steps: int = 0
    """steps of linear warmup from 0"""
    decay: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup"""
    min_lr_ratio: float = 0.0
    """final learning rate as a share of the peak"""

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be cosine, linear or constant, got {self.decay!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.factor(s, total_steps))


def with_fused_kernel(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An Adam/AdamW built with neither ``fused`` nor ``foreach`` set, rebuilt with ``fused=True``.

    torch picks the per-tensor loop for CPU tensors by default: 7.4 ms an AdamW step on the benchmark's
    0.9M-parameter model against 1.0 ms fused (3.7 ms foreach) on this machine; Hugging Face's Trainer
    (and so TRL) defaults to the fused kernel too. An explicit ``fused``/``foreach`` choice is kept.
    """
    d = opt.defaults
    if (
        type(opt) not in (torch.optim.Adam, torch.optim.AdamW)
        or opt.state
        or d.get("fused") is not None
        or d.get("foreach") is not None
        or d.get("differentiable")
        or d.get("capturable")
    ):
        return opt
    params = [p for g in opt.param_groups for p in g["params"]]
    if (
        not params
        or any(not p.is_floating_point() or p.device.type not in ("cpu", "cuda") for p in params)
        or len({p.device for p in params}) > 1
    ):
        return opt
    accepted = inspect.signature(type(opt).__init__).parameters
    kwargs = {k: v for k, v in d.items() if k in accepted}
    return type(opt)([{**g, "fused": True} for g in opt.param_groups], **{**kwargs, "fused": True})


def clip_grad_norms(groups: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Clip each named group of parameters to its own gradient norm: ``{name: (params, max_norm or
    None)}`` -> ``{f"{name}_grad_norm": norm before clipping}``. PPO clips actor and critic apart, as
    DeepSpeed-Chat's two engines do, so a large critic gradient never shrinks the actor's step.

    ``scale``: the fp16 loss scale the gradients still carry; clipping them to ``max_norm * scale`` is
    clipping the true gradients to ``max_norm`` without unscaling them twice."""
    out = {}
    for name, (params, limit) in groups.items():
        params = [p for p in params if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, limit * scale if limit else float("inf"))
            out[f"{name}_grad_norm"] = norm.detach() / scale
    return out
