"""The scalar-head model (reward model and critic: a backbone and a linear value head) and Hugging Face
sequence classifiers read as one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from rlhf_lit.hf.models.adapt import gathered, merged, zero3_construction_off
from rlhf_lit.hf.models.forward import accepts_arg, backbone_hidden, cache_arg, lm_inputs, returned_cache
from rlhf_lit.math.ops import last_attended_index, position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


SCALAR_META_FILE = "scalar_model.json"


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
        hidden = backbone_hidden(self.backbone, **lm_inputs(self.backbone, input_ids, attention_mask))
        return self.value_head(hidden).squeeze(-1).float()

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scalar score of each sequence, read at its last attended token. (B, T) -> (B,)."""
        values = self(input_ids, attention_mask)
        return values.gather(1, last_attended_index(attention_mask).unsqueeze(1)).squeeze(1)

    def score_packed(self, ids: Tensor, mask_4d: Tensor, position_ids: Tensor, last: Tensor) -> Tensor:
        """Scores of several responses packed behind their prompt in one row (the output of
        :func:`rlhf_lit.math.ops.pack_shared_prompt`): ids, position_ids (B, L), mask_4d (B, 1, L, L), last
        (B, G) -> scores (B, G), each read at its response's last token. One forward, no KV cache; needs a
        family of FOUR_D_MASK_FAMILIES."""
        out = self.backbone(input_ids=ids, attention_mask=mask_4d, position_ids=position_ids, use_cache=False)
        values = self.value_head(out.last_hidden_state).squeeze(-1).float()
        return values.gather(1, last)

    def score_shared_prompt(
        self, prompt_ids: Tensor, prompt_mask: Tensor, suffix_ids: Tensor, suffix_mask: Tensor
    ) -> Tensor:
        """Scores of several responses to each prompt with the prompt run once: the prompt forward's KV
        cache is repeated for every response (gradients flow through it). Equal to scoring each whole
        sequence (tests/test_perf_options.py) with fewer tokens: a preference pair costs P + 2R, not 2(P + R).

        prompt_ids, prompt_mask: (B, P) left-padded; suffix_ids, suffix_mask: (B * G, S) right-padded in the
        interleaved order of :func:`rlhf_lit.math.ops.split_shared_prompt`. Returns (B * G,) in that order.
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
        hidden = backbone_hidden(base, **lm_inputs(base, input_ids, attention_mask))
        last = hidden.gather(1, last_attended_index(attention_mask).view(-1, 1, 1).expand(-1, 1, hidden.size(-1)))
        return self.model.score(last).squeeze(-1).squeeze(-1).float()
