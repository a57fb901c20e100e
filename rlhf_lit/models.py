"""Model specs and the scalar-head model used as reward model and critic.

Modules receive *specs* and call ``build_*`` inside ``configure_model()``, so DeepSpeed ZeRO-3 can
partition weights at construction. ``HFModel`` loads from the hub or a directory (real
``from_pretrained`` code); ``TinyModel`` builds a small random model of a given family from a config
(offline work and tests).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from rlhf_lit.errors import InputError
from rlhf_lit.hub import hub_errors
from rlhf_lit.ops import chunked_logprobs, last_attended_index, position_ids_from_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_HEAD_FILE = "value_head.safetensors"
SCALAR_META_FILE = "scalar_model.json"


def _tiny_kwargs(family: str, h: int, layers: int, heads: int, ffn: int, positions: int) -> dict:
    """Config keywords of each family for the same small shape (names differ between families)."""
    head_dim = h // heads
    table = {
        "opt": dict(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=ffn,
            max_position_embeddings=positions,
            word_embed_proj_dim=h,
        ),
        "gpt2": dict(n_embd=h, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions),
        "bloom": dict(hidden_size=h, n_layer=layers, n_head=heads),
        "gpt_neox": dict(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=positions,
        ),
        "gptj": dict(n_embd=h, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions, rotary_dim=head_dim),
        "gpt_neo": dict(
            hidden_size=h,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=positions,
            attention_types=[[["global"], layers]],
        ),
        "codegen": dict(
            n_embd=h,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            n_positions=positions,
            n_ctx=positions,
            rotary_dim=head_dim,
        ),
        "llama": dict(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=positions,
        ),
    }
    # Modern families: grouped-query attention (2 KV heads) as the real checkpoints use it.
    gqa = dict(
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=ffn,
        max_position_embeddings=positions,
        head_dim=head_dim,
    )
    table.update(
        {
            "qwen2": {**gqa, "use_sliding_window": False},
            "mistral": {**gqa, "sliding_window": None},
            "gemma": gqa,
            "gemma2": {**gqa, "sliding_window": positions, "query_pre_attn_scalar": head_dim},
            "phi3": {k: v for k, v in gqa.items() if k != "head_dim"},
        }
    )
    if family not in table:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(table)}")
    return table[family]


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


class ModelSpec:
    """Base class: how to build a causal LM and a scalar-head model for a tokenizer."""

    gradient_checkpointing: bool = False
    pretrained: bool = True
    """whether the weights come from a checkpoint (False: randomly initialised, so evaluating the spec
    without a trained checkpoint scores noise)"""

    def build_causal_lm(self, tokenizer) -> PreTrainedModel:
        raise NotImplementedError

    def build_backbone(self, tokenizer) -> PreTrainedModel:
        raise NotImplementedError

    def value_head_path(self) -> Optional[Path]:
        """A saved value head to load with the backbone, if the spec points at a scalar-model export."""
        return None

    def build_scalar(self, tokenizer) -> "ScalarModel":
        model = ScalarModel(self.build_backbone(tokenizer))
        head = self.value_head_path()
        if head is not None:
            model.load_head(head.parent)
        return model


class HFModel(ModelSpec):
    """A pretrained model from the hub or a local directory (e.g. a stage's export)."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        gradient_checkpointing: bool = False,
        dropout: Optional[float] = None,
        gguf_file: Optional[str] = None,
    ) -> None:
        """
        Args:
            path: hub name (e.g. facebook/opt-1.3b) or local directory written by save_pretrained.
            dtype: weights dtype: float32, bfloat16 or float16.
            trust_remote_code: allow model code from the hub (off unless asked).
            revision: hub branch, tag or commit.
            gradient_checkpointing: recompute activations in backward to save memory.
            dropout: set every dropout probability of the model to this (None: keep the checkpoint's).
            gguf_file: a GGUF file inside ``path`` (dequantised on load; needs the ``gguf`` package).
                ``rlhf-lit models`` converts one to an ordinary directory once, which loads much faster.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if dropout is not None and not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.path, self.dtype, self.trust_remote_code, self.revision = path, dtype, trust_remote_code, revision
        self.gradient_checkpointing, self.dropout, self.gguf_file = gradient_checkpointing, dropout, gguf_file

    def _load(self, auto_cls, tokenizer):
        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        with hub_errors(self.path, "model"):
            model = auto_cls.from_pretrained(
                self.path,
                dtype=DTYPES[self.dtype],
                trust_remote_code=self.trust_remote_code,
                revision=self.revision,
                **kw,
            )
        if self.dropout is not None:
            set_dropout(model, self.dropout)
        return fit_vocab(model, tokenizer)

    def build_causal_lm(self, tokenizer):
        return self._load(AutoModelForCausalLM, tokenizer)

    def build_backbone(self, tokenizer):
        return self._load(AutoModel, tokenizer)

    def value_head_path(self):
        p = Path(self.path) / VALUE_HEAD_FILE
        return p if p.exists() else None

    def checkpoint_format(self) -> str:
        """'rlhf_lit' (a scalar-model export), 'sequence_classification' (a transformers
        ``*ForSequenceClassification`` checkpoint) or 'causal' (a causal/base LM: the head is new)."""
        if self.value_head_path() is not None:
            return "rlhf_lit"
        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        with hub_errors(self.path, "model config"):
            cfg = AutoConfig.from_pretrained(
                self.path, trust_remote_code=self.trust_remote_code, revision=self.revision, **kw
            )
        return (
            "sequence_classification"
            if any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
            else "causal"
        )

    def build_classifier(self, tokenizer) -> "SequenceClassifier":
        """A ``*ForSequenceClassification`` checkpoint with one label, its score head used as is."""
        from transformers import AutoModelForSequenceClassification

        model = self._load(AutoModelForSequenceClassification, tokenizer)
        if model.config.num_labels != 1:
            raise InputError(
                f"{self.path}: a reward model needs one label (a scalar score); this sequence-classification "
                f"checkpoint has num_labels={model.config.num_labels}"
            )
        return SequenceClassifier(model)

    def build_scalar(self, tokenizer) -> "ScalarModel":
        """Backbone + value head from an rlhf-lit export, a one-label sequence-classification checkpoint
        (its decoder and score head: a published reward model as critic init), or a raw checkpoint (new head)."""
        if self.checkpoint_format() != "sequence_classification":
            return super().build_scalar(tokenizer)
        clf = self.build_classifier(tokenizer)
        if not clf.decoder:
            raise InputError(
                f"{self.path}: an encoder classifier ({clf.model.config.model_type}) has no per-token values; "
                "a critic needs a decoder model"
            )
        model = ScalarModel(clf.model.base_model)
        with gathered([model.value_head.weight, clf.model.score.weight], modifier_rank=0):
            model.value_head.weight.data.copy_(clf.model.score.weight.data.to(model.value_head.weight.dtype))
        model.meta = clf.meta
        return model


class TinyModel(ModelSpec):
    """A small randomly initialised model of a given family, built from a config (offline)."""

    pretrained = False

    def __init__(
        self,
        family: str = "opt",
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_size: int = 256,
        max_positions: int = 256,
        dropout: float = 0.0,
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            family: opt, gpt2, bloom, gpt_neox, gptj, gpt_neo, codegen, llama, qwen2, mistral, gemma, gemma2 or phi3.
            hidden_size: model width.
            num_layers: transformer blocks.
            num_heads: attention heads (must divide hidden_size).
            ffn_size: feed-forward width.
            max_positions: longest sequence the position embeddings cover.
            dropout: every dropout probability of the config (0 for reproducible small runs).
            seed: initialisation seed (weights are the same for the same seed and shape).
            gradient_checkpointing: recompute activations in backward to save memory.
        """
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.family, self.dropout, self.seed = family, dropout, seed
        self.kwargs = _tiny_kwargs(family, hidden_size, num_layers, num_heads, ffn_size, max_positions)
        self.gradient_checkpointing = gradient_checkpointing

    def config(self, tokenizer):
        ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        cfg = AutoConfig.for_model(self.family, vocab_size=len(tokenizer), **ids, **self.kwargs)
        _config_dropout(cfg, self.dropout)
        return cfg

    def _build(self, auto_cls, tokenizer):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return auto_cls.from_config(self.config(tokenizer))

    def build_causal_lm(self, tokenizer):
        return self._build(AutoModelForCausalLM, tokenizer)

    def build_backbone(self, tokenizer):
        return self._build(AutoModel, tokenizer)


MAX_ADDED_TOKENS = 1024
"""tokens a tokenizer may have beyond a pretrained model's embeddings (a pad, chat-template specials)"""


def fit_vocab(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """Grow the embeddings when the tokenizer gained tokens (an added pad); set the pad id.

    New rows are the mean of the existing ones, not transformers' random draw (``mean_resizing``
    samples around the mean): actor, reference, critic and reward model get identical rows, so the
    KL to the reference is exactly 0 at step 0."""
    if tokenizer is not None:
        old = model.get_input_embeddings().num_embeddings
        if len(tokenizer) - old > MAX_ADDED_TOKENS:  # not added tokens: another model's tokenizer (#28)
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise InputError(
                f"{name} has {len(tokenizer)} tokens but the model's embeddings have {old} rows: a tokenizer of "
                f"another model? (rlhf-lit grows the embeddings by at most {MAX_ADDED_TOKENS} added tokens)"
            )
        if len(tokenizer) > old:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for emb in {
                    id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
                }.values():
                    emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


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


FROZEN_DTYPES = ("bfloat16", "float16", "float32")


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
    mode = os.environ.get(NATIVE_BF16_ENV, "auto").strip().lower() or "auto"
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    if mode != "auto":
        raise ValueError(f"{NATIVE_BF16_ENV} must be auto, 1 or 0, got {mode!r}")
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


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


def lm_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict:
    """Forward keywords with explicit ``position_ids`` where the family takes them (left padding safe)."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_arg(model, "position_ids"):
        kw["position_ids"] = position_ids_from_mask(attention_mask)
    return kw


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
    positions they need, in chunks (:func:`rlhf_lit.ops.chunked_logprobs`): a (B, T, V) logits tensor is
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
    return base.base_model(**inputs, use_cache=False).last_hidden_state, head


def next_token_logprobs(model: nn.Module, **inputs) -> Tensor:
    """Log-prob of each next token, (B, T - 1): entry t is token t+1 predicted at position t. ``inputs``:
    the forward's keywords, ``input_ids`` (B, T) among them; computed in LM-head chunks."""
    hidden, head = lm_hidden(model, **inputs)
    return chunked_logprobs(hidden[:, :-1], head, inputs["input_ids"][:, 1:])[0]


class ScalarModel(nn.Module):
    """A transformer backbone with a linear head giving one value per token (reward model, critic)."""

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone
        # OPT projects its output to word_embed_proj_dim, not hidden_size; the input embedding width
        # equals the last hidden state's width in every supported family.
        width = backbone.get_input_embeddings().embedding_dim
        self.value_head = nn.Linear(width, 1, bias=False)
        self.meta: dict = {}

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, T) -> values (B, T)."""
        out = self.backbone(**lm_inputs(self.backbone, input_ids, attention_mask), use_cache=False)
        return self.value_head(out.last_hidden_state).squeeze(-1).float()

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scalar score of each sequence, read at its last attended token. (B, T) -> (B,)."""
        values = self(input_ids, attention_mask)
        return values.gather(1, last_attended_index(attention_mask).unsqueeze(1)).squeeze(1)

    def score_shared_prompt(
        self, prompt_ids: Tensor, prompt_mask: Tensor, suffix_ids: Tensor, suffix_mask: Tensor
    ) -> Tensor:
        """Scores of several responses to each prompt with the prompt run once: the prompt forward's KV
        cache is repeated for every response (gradients flow through it). Equal to scoring each whole
        sequence (tests/test_perf_options.py) with fewer tokens: a preference pair costs P + 2R, not 2(P + R).

        prompt_ids, prompt_mask: (B, P) left-padded; suffix_ids, suffix_mask: (B * G, S) right-padded in the
        interleaved order of :func:`rlhf_lit.ops.split_shared_prompt`. Returns (B * G,) in that order.
        """
        groups = suffix_ids.size(0) // prompt_ids.size(0)
        out = self.backbone(**lm_inputs(self.backbone, prompt_ids, prompt_mask), use_cache=True)
        cache = returned_cache(out)
        cache.batch_repeat_interleave(groups)
        mask = torch.cat([prompt_mask.repeat_interleave(groups, 0), suffix_mask], 1)
        kw = {"input_ids": suffix_ids, "attention_mask": mask}
        if accepts_arg(self.backbone, "position_ids"):
            kw["position_ids"] = position_ids_from_mask(mask)[:, prompt_ids.size(1) :]
        hidden = self.backbone(**kw, **cache_arg(self.backbone, cache), use_cache=True).last_hidden_state
        values = self.value_head(hidden).squeeze(-1).float()
        return values.gather(1, last_attended_index(suffix_mask).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str | Path, meta: Optional[dict] = None) -> None:
        """Save as the family's ``*ForSequenceClassification`` checkpoint with one label, ``meta`` (e.g. the
        reward stage's score_mean/score_std) in its config: TRL, RewardBench and
        ``pipeline("text-classification")`` load it as it is, and so does rlhf-lit (critic or reward).
        Families without such a class (CodeGen) get the backbone, ``value_head.safetensors`` and JSON meta."""
        path = Path(path)
        meta = {**self.meta, **(meta or {})}
        backbone = merged(self.backbone)  # a LoRA critic's adapters merged in (a copy)
        clf = as_sequence_classifier(backbone, self.value_head)
        if clf is None:
            backbone.save_pretrained(path, safe_serialization=True)
            save_file({"weight": self.value_head.weight.detach().contiguous().cpu()}, str(path / VALUE_HEAD_FILE))
            (path / SCALAR_META_FILE).write_text(json.dumps(meta, indent=2))
            return
        for key, value in meta.items():
            setattr(clf.config, key, value)
        clf.save_pretrained(path, safe_serialization=True)

    def load_head(self, path: str | Path) -> None:
        path = Path(path)
        with gathered([self.value_head.weight], modifier_rank=0):
            self.value_head.weight.data.copy_(load_file(str(path / VALUE_HEAD_FILE))["weight"])
        meta = path / SCALAR_META_FILE
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}


@contextlib.contextmanager
def zero3_construction_off():
    """Models built inside are whole on this rank: transformers' ZeRO-3 switch (the HfDeepSpeedConfig that
    rlhf_lit.strategies keeps alive for configure_model) is turned off for the block. transformers keeps
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


def as_sequence_classifier(backbone: PreTrainedModel, head: nn.Linear) -> Optional[PreTrainedModel]:
    """``backbone`` and a one-output ``head`` as the family's sequence-classification model (its ``score``
    layer), or None where transformers has no such class or its head has another shape."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(backbone.config)
    cfg.num_labels, cfg.architectures = 1, None
    try:
        # The throw-away initialisation must not move the RNG stream, nor enter ZeRO-3's collective
        # partitioned construction: the export runs on rank 0 alone (the other ranks would never join).
        with torch.random.fork_rng(devices=[]), zero3_construction_off():
            clf = AutoModelForSequenceClassification.from_config(cfg, dtype=backbone.dtype)
    except ValueError:  # "Unrecognized configuration class": no classifier for this family
        return None
    score = getattr(clf, "score", None)
    if not isinstance(score, nn.Linear) or score.weight.shape != head.weight.shape:
        return None
    clf.base_model.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        score.weight.copy_(head.weight.detach().to(score.weight.dtype))
        if score.bias is not None:
            score.bias.zero_()
    clf.config.pad_token_id = backbone.config.pad_token_id
    return clf


class SequenceClassifier(nn.Module):
    """A transformers sequence-classification model with one label, as a reward model.

    Decoder models (a ``score`` head: Llama, Mistral, Qwen, GPT-2, OPT...) are read at the last attended
    token of the attention mask: transformers looks for the last token that is not the pad id, which is
    wrong when pad equals eos and a reply ends with eos. Encoders (BERT, DeBERTa) use their own pooling."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        head = getattr(model, "score", None)
        self.decoder = isinstance(head, nn.Linear) and not getattr(model.config, "is_encoder_decoder", False)
        cfg = model.config
        keys = ("score_mean", "score_std", "score_stats_from")
        self.meta = {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}

    @property
    def config(self):
        return self.model.config

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) -> (B,) float scores."""
        if not self.decoder:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        base = self.model.base_model
        hidden = base(**lm_inputs(base, input_ids, attention_mask), use_cache=False).last_hidden_state
        last = hidden.gather(1, last_attended_index(attention_mask).view(-1, 1, 1).expand(-1, 1, hidden.size(-1)))
        return self.model.score(last).squeeze(-1).squeeze(-1).float()


def load_scalar_model(path: str, dtype: str = "float32") -> ScalarModel:
    """Open a reward/critic export (:meth:`ScalarModel.save_pretrained`) or any one-label
    sequence-classification checkpoint with a decoder."""
    spec = HFModel(path, dtype=dtype)
    if spec.checkpoint_format() == "causal":
        raise InputError(f"{path} is not a reward model (a sequence-classification checkpoint or rlhf-lit export)")
    return spec.build_scalar(None)
