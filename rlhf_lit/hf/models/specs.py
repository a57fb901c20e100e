"""How a model is built: ``HFModel`` (hub or directory, real ``from_pretrained``), ``TinyModel`` (a small
random model of a given family, offline), the family table, vocabulary fitting, scalar-model exports."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from rlhf_lit.errors import InputError
from rlhf_lit.hf.hub import hub_errors
from rlhf_lit.hf.models.attention import use_fp32_cpu_attention
from rlhf_lit.hf.models.adapt import _config_dropout, gathered, set_dropout
from rlhf_lit.hf.models.precision import DTYPES
from rlhf_lit.hf.models.scalar import VALUE_HEAD_FILE, ScalarModel, SequenceClassifier


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
        return use_fp32_cpu_attention(fit_vocab(model, tokenizer))

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
            return use_fp32_cpu_attention(auto_cls.from_config(self.config(tokenizer)))

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


def load_scalar_model(path: str, dtype: str = "float32") -> ScalarModel:
    """Open a reward/critic export (:meth:`ScalarModel.save_pretrained`) or any one-label
    sequence-classification checkpoint with a decoder."""
    spec = HFModel(path, dtype=dtype)
    if spec.checkpoint_format() == "causal":
        raise InputError(f"{path} is not a reward model (a sequence-classification checkpoint or rlhf-lit export)")
    return spec.build_scalar(None)
