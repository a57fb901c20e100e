"""What a stage changes on a built model: LoRA adapters (and merging them back), dropout, gradient
checkpointing, and gathering ZeRO-3-partitioned parameters."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

from torch import nn
from transformers import PreTrainedModel


@dataclass
class LoRA:
    """Low-rank adapters (peft) on the actor/SFT model; merged into the weights on export."""

    r: int = 8
    """adapter rank"""
    alpha: int = 16
    """scaling numerator (the update is scaled by alpha / r)"""
    dropout: float = 0.0
    """dropout on the adapter input"""
    target_modules: Optional[list[str]] = None
    """module names to adapt; None lets peft pick the family's attention projections"""

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r > 0 and alpha > 0, got r={self.r}, alpha={self.alpha}")


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Every dropout of ``model`` set to ``p``: ``nn.Dropout`` modules, the float probabilities that
    attention modules pass to functional dropout (``attention_dropout`` in Llama, ``dropout`` in OPT),
    and the config, so what it builds later agrees."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, p)
    config = getattr(model, "config", None)
    if config is not None:
        _config_dropout(config, p)
    return model


def _config_dropout(config, p: float) -> None:
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, p)


def has_dropout(model: nn.Module) -> bool:
    """Whether any dropout of ``model`` is active (p > 0), as set_dropout finds them."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        if any("dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(module).items()):
            return True
    return False


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing of every transformer layer. Non-reentrant: it works when the inputs do
    not require gradients (frozen embeddings, LoRA) and under torch.compile. It runs only in train
    mode, so the stage modules put trainable models in train mode (``from_pretrained`` returns eval)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(model: PreTrainedModel, lora: Optional[LoRA], task_type: Optional[str] = "CAUSAL_LM") -> nn.Module:
    """``model`` with peft LoRA adapters (its own weights frozen); ``task_type`` None for a bare backbone
    (a critic's: the value head beside it stays trainable)."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def merged(model: nn.Module) -> PreTrainedModel:
    """The plain transformers model to export: itself, or a copy with its LoRA adapters merged in
    (the copy leaves the training model's adapters untouched)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


@contextlib.contextmanager
def gathered(params, modifier_rank: Optional[int] = None):
    """Inside the block, ZeRO-3-partitioned parameters among ``params`` are whole (collective: every
    rank must enter); with ``modifier_rank`` set, that rank's in-place edits are scattered back on exit.
    A no-op for ordinary parameters, so callers need not know the strategy."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def zero3_construction_off():
    """Models built inside are whole on this rank: transformers' ZeRO-3 switch (the HfDeepSpeedConfig that
    rlhf_lit.training.strategies keeps alive for configure_model) is turned off for the block. transformers keeps
    it as a module-level weak reference with no public getter, hence the private name."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
