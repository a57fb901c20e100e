"""Hugging Face model adapters, one concern a file:

- ``specs``: how a model is built (``HFModel`` from the hub or a directory, ``TinyModel`` from a config),
  the family table, vocabulary fitting, loading a scalar-model export;
- ``adapt``: LoRA, dropout, gradient checkpointing, ZeRO-3 gathering;
- ``precision``: frozen models held in bf16/fp16 and computed where the hardware can;
- ``forward``: forward-signature introspection, the hidden states and LM head, next-token log-probs;
- ``scalar``: the scalar-head model (reward model and critic) and sequence classifiers.

Modules receive *specs* and call ``build_*`` inside ``configure_model()``, so DeepSpeed ZeRO-3 can
partition weights at construction. Configs name the classes here (``rlhf_lit.hf.models.HFModel``).
"""

from rlhf_lit.hf.models.adapt import (
    LoRA,
    apply_lora,
    enable_checkpointing,
    gathered,
    has_dropout,
    merged,
    set_dropout,
    zero3_construction_off,
)
from rlhf_lit.hf.models.forward import (
    FOUR_D_MASK_FAMILIES,
    accepts_arg,
    cache_arg,
    lm_hidden,
    lm_inputs,
    next_token_logprobs,
    response_logps,
    returned_cache,
    takes_4d_mask,
)
from rlhf_lit.hf.models.precision import (
    DTYPES,
    FROZEN_DTYPES,
    NATIVE_BF16_ENV,
    autocast_dtype,
    check_frozen_dtype,
    cpu_bf16_native,
    hold_frozen,
    native_half,
)
from rlhf_lit.hf.models.scalar import (
    SCALAR_META_FILE,
    VALUE_HEAD_FILE,
    ScalarModel,
    SequenceClassifier,
    as_sequence_classifier,
)
from rlhf_lit.hf.models.specs import MAX_ADDED_TOKENS, HFModel, ModelSpec, TinyModel, fit_vocab, load_scalar_model

__all__ = [
    "DTYPES",
    "FROZEN_DTYPES",
    "HFModel",
    "LoRA",
    "MAX_ADDED_TOKENS",
    "ModelSpec",
    "NATIVE_BF16_ENV",
    "SCALAR_META_FILE",
    "ScalarModel",
    "SequenceClassifier",
    "TinyModel",
    "VALUE_HEAD_FILE",
    "accepts_arg",
    "apply_lora",
    "as_sequence_classifier",
    "autocast_dtype",
    "cache_arg",
    "check_frozen_dtype",
    "cpu_bf16_native",
    "enable_checkpointing",
    "fit_vocab",
    "gathered",
    "has_dropout",
    "hold_frozen",
    "lm_hidden",
    "lm_inputs",
    "FOUR_D_MASK_FAMILIES",
    "takes_4d_mask",
    "load_scalar_model",
    "merged",
    "native_half",
    "next_token_logprobs",
    "response_logps",
    "returned_cache",
    "set_dropout",
    "zero3_construction_off",
]
