"""Reward sources for PPO: a trained reward model, a Python callable, a remote HTTP endpoint, or a
weighted sum of several.

Each is an ``nn.Module`` (so a reward model is a frozen submodule that ZeRO-3 can partition) with
``build(tokenizer)`` called from ``configure_model`` and ``forward(prompts, responses, input_ids,
attention_mask, columns) -> scores (B,)``; ``columns`` holds the rows' extra fields (e.g. a reference
answer), ``{name: [value per row]}``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.errors import InputError
from rlhf_lit.hf.chat_format import ChatFormat
from rlhf_lit.hf.models import HFModel
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.math.ops import pad_sequences


class RewardSource(nn.Module):
    """Base class of reward sources. Scores are raw (clipping and KL shaping happen in PPO)."""

    def build(self, tokenizer) -> None:
        """Build models; ``tokenizer`` is the actor's."""

    def forward(
        self,
        prompts: list[str],
        responses: list[str],
        input_ids: Tensor,
        attention_mask: Tensor,
        columns: Optional[dict[str, list]] = None,
    ) -> Tensor:
        """prompts/responses: B texts; input_ids, attention_mask: (B, T) actor tokens of prompt + response;
        columns: the rows' extra fields, ``{name: [B values]}`` (e.g. ``answer``). Returns (B,) float scores."""
        raise NotImplementedError


def score(source, prompts, responses, input_ids, attention_mask, columns: Optional[dict] = None, ended=None) -> Tensor:
    """``source``'s scores, passing ``columns`` only when there are some: a reward source written before
    columns existed (``forward(prompts, responses, input_ids, attention_mask)``) keeps working. ``ended``
    ((B,) bool: the reply stopped at a stop token, not at max_new_tokens) reaches sources whose forward
    takes it (a reward model re-rendering the reply appends the end-of-turn token only to ended ones)."""
    takes = "ended" in inspect.signature(getattr(source, "forward", source)).parameters  # a plain callable too
    kw = {"ended": ended} if ended is not None and takes else {}
    if columns:
        return source(prompts, responses, input_ids, attention_mask, columns, **kw)
    return source(prompts, responses, input_ids, attention_mask, **kw)


FORMATS = ("auto", "rlhf_lit", "sequence_classification", "causal")


def same_tokenization(a, b) -> bool:
    """Whether two tokenizers turn a conversation into the same ids: the same vocabulary, special
    tokens (pad aside: padding is masked) and chat format. Compared directly, not by a fingerprint
    that two different resizes can make equal (issue #17)."""
    if a.get_vocab() != b.get_vocab():
        return False
    specials = lambda t: (t.bos_token, t.eos_token, t.unk_token)
    fa, fb = ChatFormat(a), ChatFormat(b)
    return specials(a) == specials(b) and (a.chat_template or None) == (b.chat_template or None) and fa.bos == fb.bos


class ModelReward(RewardSource):
    """A frozen reward model: an rlhf-lit reward export, any Hugging Face sequence-classification
    checkpoint with one label (a published reward model), or a raw causal checkpoint with a new head.

    When the reward model's tokenizer differs from the actor's (vocabulary, special tokens or chat
    template), the conversation is rendered its own way (prompt and response as messages through its
    template, else HH text) and re-tokenised, cut in the middle to ``max_length`` tokens."""

    def __init__(
        self,
        path: str,
        normalize: bool = True,
        dtype: str = "float32",
        format: str = "auto",
        chat_template: str = "auto",
        max_length: Optional[int] = None,
        stats_rollouts: int = 0,
    ) -> None:
        """
        Args:
            path: directory (or hub name) of the reward model and its tokenizer.
            normalize: standardise scores with the score_mean/score_std saved with the model (rlhf-lit exports,
                or a sequence-classification config carrying them); see stats_rollouts for models without them.
            dtype: weights dtype.
            format: 'auto' (detected), 'rlhf_lit', 'sequence_classification' or 'causal' (a new, untrained head:
                for wiring tests and critic init, not a meaningful reward).
            chat_template: how this model's tokenizer renders conversations ('auto', 'hh' or a Jinja file).
            max_length: longest sequence scored when re-tokenising (default: the model's position limit);
                longer ones lose tokens after their header (the oldest turns; BOS and the template's system block
                and first role header stay), counted in ``truncated`` (logged as reward/truncated_rows).
            stats_rollouts: with normalize and no saved statistics, estimate mean/std from the scores of the
                first N calls (rollout batches; running estimates meanwhile), then keep them fixed.
        """
        super().__init__()
        if format not in FORMATS:
            raise InputError(f"ModelReward format must be one of {FORMATS}, got {format!r}")
        if stats_rollouts < 0:
            raise InputError(f"ModelReward stats_rollouts must be >= 0, got {stats_rollouts}")
        self.path, self.normalize, self.dtype, self.format = path, normalize, dtype, format
        self.chat_template, self.max_length, self.stats_rollouts = chat_template, max_length, stats_rollouts
        self.model = None
        self.tokenizer = None
        self.same_tokenizer = True
        self.truncated = 0
        self._moments = [0, 0, 0.0, 0.0]  # calls, scores, their sum and sum of squares (stats_rollouts)

    def build(self, tokenizer) -> None:
        if self.model is not None:
            return
        spec = HFModel(self.path, dtype=self.dtype)
        fmt = spec.checkpoint_format() if self.format == "auto" else self.format
        self.model = spec.build_classifier(None) if fmt == "sequence_classification" else spec.build_scalar(None)
        self.model.eval().requires_grad_(False)
        self.tokenizer = HFTokenizer(self.path, chat_template=self.chat_template).load()
        self.same_tokenizer = tokenizer is not None and same_tokenization(self.tokenizer, tokenizer)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = self.max_length or positions or 4096
        if self.normalize and not {"score_mean", "score_std"} <= set(self.model.meta) and not self.stats_rollouts:
            raise InputError(
                f"reward model {self.path} has no saved score statistics (score_mean/score_std): "
                "set normalize: false, or stats_rollouts: N to estimate them on the first N rollouts"
            )

    def encode(self, prompts: list, responses: list[str], device, ended=None) -> tuple[Tensor, Tensor]:
        """The texts rendered and tokenised the reward model's way (the end-of-turn token only after replies
        that ``ended``, as the actor's own tokens have it), a too-long one cut in the middle: its start
        (BOS, system block, first role header) and its end (the latest turns and the reply) are kept."""
        fmt = ChatFormat(self.tokenizer)
        if not fmt.template:  # an HH reward model always saw "Assistant: reply" (a template actor's has no space)
            responses = [r if not r or r[:1].isspace() else " " + r for r in responses]
        ended = None if ended is None else [bool(e) for e in ended]
        out, whole = [], [p + r for p, r in zip(fmt.prompt_ids(prompts), fmt.response_ids(responses, ended))]
        for prompt, x in zip(prompts, whole):
            if len(x) > self.max_length:
                self.truncated += 1
                keep = min(fmt.header_len(prompt), self.max_length // 2)
                x = x[:keep] + x[len(x) - (self.max_length - keep) :]
            out.append(x)
        ids, mask = pad_sequences(out, self.tokenizer.pad_token_id)
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def forward(self, prompts, responses, input_ids, attention_mask, columns=None, ended=None):
        """``ended``: (B,) bool, whether each reply stopped at a stop token (None: all did)."""
        if not self.same_tokenizer:
            input_ids, attention_mask = self.encode(prompts, responses, input_ids.device, ended)
        scores = self.model.score(input_ids, attention_mask)
        if self.normalize:
            mean, std = self.statistics(scores)
            scores = (scores - mean) / max(std, 1e-6)
        return scores

    def statistics(self, scores: Tensor) -> tuple[float, float]:
        """Saved mean/std, or running estimates over the first ``stats_rollouts`` calls (then fixed)."""
        meta = self.model.meta
        if {"score_mean", "score_std"} <= set(meta):
            return meta["score_mean"], meta["score_std"]
        calls, n, total, squares = self._moments
        if calls < self.stats_rollouts:
            calls, n = calls + 1, n + scores.numel()
            total, squares = total + float(scores.sum()), squares + float((scores.double() ** 2).sum())
            self._moments = [calls, n, total, squares]
        mean = total / max(n, 1)
        return mean, max(squares / max(n, 1) - mean**2, 0.0) ** 0.5


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
    """A Python function scoring one response (rule-based, verifiable rewards)::

        def reward(prompt: str, response: str, **columns) -> float

    ``columns`` are the row's extra fields kept by its source (``extra: [answer]``): the function receives
    those it names (``def exact(prompt, response, answer)``), or all of them with ``**kwargs``. A column it
    requires that the rows do not carry is a one-line error."""

    def __init__(self, function: str) -> None:
        """
        Args:
            function: import path, e.g. 'datamodules.synthetic:gold_reward'.
        """
        super().__init__()
        self.function = function
        self.fn = import_callable(function)
        try:
            params = list(inspect.signature(self.fn).parameters.values())[2:]
        except (TypeError, ValueError):  # builtins without a signature: prompt and response only
            params = []
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.names = [p.name for p in named]
        self.required = [p.name for p in named if p.default is p.empty]

    def kwargs(self, columns: Optional[dict[str, list]], n: int) -> list[dict]:
        """The keyword arguments of each of the n calls."""
        columns = columns or {}
        missing = [c for c in self.required if c not in columns]
        if missing:
            raise InputError(
                f"reward function {self.function} needs column {missing[0]!r} but the prompts carry "
                f"{sorted(columns) or 'none'} (keep it with the source's option extra: [{missing[0]}])"
            )
        names = list(columns) if self.takes_all else [c for c in self.names if c in columns]
        return [{c: columns[c][i] for c in names} for i in range(n)]

    def forward(self, prompts, responses, input_ids, attention_mask, columns=None):
        kw = self.kwargs(columns, len(prompts))
        return torch.tensor(
            [float(self.fn(p, r, **k)) for p, r, k in zip(prompts, responses, kw)], device=input_ids.device
        )


class HTTPReward(RewardSource):
    """A remote reward service (a sandboxed code runner, a judge model behind an API, a math checker).

    Each batch of up to ``batch_size`` rows is POSTed as JSON ``{"prompts": [...], "responses": [...],
    "columns": {name: [...]}}``; the server answers ``{"rewards": [float, ...]}`` in the same order.
    Timeouts, connection errors and 5xx answers are retried ``retries`` times with exponential backoff;
    anything else (4xx, a wrong answer shape) is a one-line error naming the URL."""

    def __init__(
        self,
        url: str,
        batch_size: int = 64,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        """
        Args:
            url: the endpoint, e.g. http://127.0.0.1:8000/score.
            batch_size: rows per request.
            timeout: seconds to wait for each request.
            retries: further attempts after a timeout, a connection error or a 5xx answer.
            backoff: seconds before the first retry, doubled after each.
            headers: extra HTTP headers (e.g. an Authorization token).
        """
        super().__init__()
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("HTTPReward needs batch_size >= 1, timeout > 0, retries >= 0 and backoff >= 0")
        self.url, self.batch_size, self.timeout, self.retries, self.backoff = url, batch_size, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.requests = 0  # HTTP requests sent, retries included (logged by tests and users' callbacks)

    def post(self, payload: dict) -> list[float]:
        data, wait, last = json.dumps(payload).encode(), self.backoff, None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            self.requests += 1
            try:
                req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    answer = json.loads(resp.read())
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise InputError(f"reward server {self.url} answered HTTP {e.code}: {e.reason}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise InputError(f"reward server {self.url} did not answer JSON") from None
        else:
            raise InputError(f"reward server {self.url} failed after {self.retries + 1} attempts: {last}")
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        n = len(payload["prompts"])
        if not isinstance(rewards, list) or len(rewards) != n:
            want = f'{{"rewards": [{n} numbers]}}'
            raise InputError(f"reward server {self.url} must answer {want}, got {str(answer)[:80]}")
        return [float(r) for r in rewards]

    def forward(self, prompts, responses, input_ids, attention_mask, columns=None):
        out, columns = [], columns or {}
        for i in range(0, len(prompts), self.batch_size):
            j = i + self.batch_size
            cols = {k: list(v[i:j]) for k, v in columns.items()}
            out += self.post({"prompts": list(prompts[i:j]), "responses": list(responses[i:j]), "columns": cols})
        return torch.tensor(out, device=input_ids.device)


class SumReward(RewardSource):
    """A weighted sum of reward sources."""

    def __init__(self, sources: list[RewardSource], weights: Optional[list[float]] = None) -> None:
        """
        Args:
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

    def forward(self, prompts, responses, input_ids, attention_mask, columns=None, ended=None):
        return sum(
            w * score(s, prompts, responses, input_ids, attention_mask, columns, ended)
            for w, s in zip(self.weights, self.sources)
        )
