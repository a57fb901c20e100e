"""Reward sources for PPO: a trained reward model, a Python callable, or a weighted sum of several.

Each is an ``nn.Module`` (so a reward model is a frozen submodule that ZeRO-3 can partition) with
``build(tokenizer)`` called from ``configure_model`` and ``forward(prompts, responses, input_ids,
attention_mask) -> scores (B,)``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from rlhf_lit.chat_format import ChatFormat
from rlhf_lit.models import HFModel
from rlhf_lit.ops import pad_sequences
from rlhf_lit.tokenizer import HFTokenizer, tokenizer_fingerprint


class RewardSource(nn.Module):
    """Base class of reward sources. Scores are raw (clipping and KL shaping happen in PPO)."""

    def build(self, tokenizer) -> None:
        """Build models; ``tokenizer`` is the actor's."""

    def forward(self, prompts: list[str], responses: list[str], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """prompts/responses: B texts; input_ids, attention_mask: (B, T) actor tokens of prompt + response.
        Returns (B,) float scores."""
        raise NotImplementedError


class ModelReward(RewardSource):
    """A reward model exported by the reward stage (or any scalar-head export), frozen."""

    def __init__(self, path: str, normalize: bool = True, dtype: str = "float32") -> None:
        """Args:
        path: directory of a reward export (backbone + value_head.safetensors + tokenizer).
        normalize: standardise scores with the mean/std the reward stage saved with the export.
        dtype: weights dtype.
        """
        super().__init__()
        self.path, self.normalize, self.dtype = path, normalize, dtype
        self.model = None
        self.tokenizer = None
        self.same_tokenizer = True

    def build(self, tokenizer) -> None:
        if self.model is not None:
            return
        self.model = HFModel(self.path, dtype=self.dtype).build_scalar(None)
        self.model.eval().requires_grad_(False)
        self.tokenizer = HFTokenizer(self.path).load()
        # A reward model trained with another tokenizer still works: it re-tokenizes the texts.
        self.same_tokenizer = tokenizer_fingerprint(self.tokenizer) == tokenizer_fingerprint(tokenizer)
        meta = self.model.meta
        if self.normalize and not {"score_mean", "score_std"} <= set(meta):
            raise ValueError(f"reward export {self.path} has no score_mean/score_std; set normalize: false")

    @torch.no_grad()
    def forward(self, prompts, responses, input_ids, attention_mask):
        if not self.same_tokenizer:  # the reward model's own chat format, as its stage encoded pairs
            fmt = ChatFormat(self.tokenizer)
            ids = [p + r for p, r in zip(fmt.prompt_ids(prompts), fmt.response_ids(responses))]
            input_ids, attention_mask = (t.to(input_ids.device) for t in pad_sequences(ids, self.tokenizer.pad_token_id))
        scores = self.model.score(input_ids, attention_mask)
        if self.normalize:
            scores = (scores - self.model.meta["score_mean"]) / max(self.model.meta["score_std"], 1e-6)
        return scores


def import_callable(target: str) -> Callable:
    """'package.module:function' or 'package.module.function' -> the function."""
    module, sep, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {target!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{target!r} is not callable")
    return fn


class CallableReward(RewardSource):
    """A Python function ``fn(prompt: str, response: str) -> float`` (rule-based, verifiable rewards)."""

    def __init__(self, function: str) -> None:
        """Args:
        function: import path, e.g. 'datamodules.synthetic:gold_reward'.
        """
        super().__init__()
        self.function = function
        self.fn = import_callable(function)

    def forward(self, prompts, responses, input_ids, attention_mask):
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)], device=input_ids.device)


class SumReward(RewardSource):
    """A weighted sum of reward sources."""

    def __init__(self, sources: list[RewardSource], weights: Optional[list[float]] = None) -> None:
        """Args:
        sources: the reward sources.
        weights: one weight per source (default all 1).
        """
        super().__init__()
        weights = weights or [1.0] * len(sources)
        if len(weights) != len(sources) or not sources:
            raise ValueError(f"SumReward needs one weight per source, got {len(weights)} for {len(sources)}")
        self.sources, self.weights = nn.ModuleList(sources), weights

    def build(self, tokenizer):
        for s in self.sources:
            s.build(tokenizer)

    def forward(self, prompts, responses, input_ids, attention_mask):
        return sum(w * s(prompts, responses, input_ids, attention_mask) for w, s in zip(self.weights, self.sources))
