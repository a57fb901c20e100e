"""Blends of sources with weights, split deterministically into disjoint named parts, one per stage.

As DeepSpeed-Chat's ``--data_split 2,4,4``: each source's rows are shuffled with a seed and cut into
parts (plus one held-out eval part shared by every stage), so no stage trains on another stage's rows.
``split: [2, 4, 4]`` names the parts sft, reward and ppo; ``split: {sft: 2, pairs: 4, prompts: 4}``
names any number of them, and each datamodule reads the part its ``part:`` names. Numpy's
PCG64 generator makes the split the same on every machine for the same seed.
Pure Python/numpy: no lightning, deepspeed or wandb.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from datamodules.sources import LoadResult, load_source

STAGES = ("sft", "reward", "ppo")
"""the kinds of data a stage reads: demonstrations, preference pairs, prompts (and the default part names)"""


def supports(record: dict, stage: str) -> bool:
    """Whether a record has what a kind needs: sft a response (or a chosen one), reward a pair, ppo a
    prompt; a part of another name takes any record."""
    if stage == "sft":
        return "response" in record or "chosen" in record
    if stage == "reward":
        return "chosen" in record and "rejected" in record
    return "prompt" in record


def view(record: dict, stage: str) -> dict:
    """The fields of ``record`` that ``stage`` uses (SFT trains on the chosen reply of a pair)."""
    base = {"source": record["source"], "row": record["row"], "prompt": record["prompt"]}
    if "messages" in record:  # conversational rows render their messages through the chat template
        base["messages"] = record["messages"]
    if "columns" in record:  # a row's extra fields (e.g. a reference answer) reach reward functions (#15)
        base["columns"] = record["columns"]
    if stage == "sft":
        return {**base, "response": record.get("response", record.get("chosen"))}
    if stage == "reward":
        out = {**base, "chosen": record["chosen"], "rejected": record["rejected"]}
        if "margin" in record:
            out["margin"] = record["margin"]
        return out
    return base


@dataclass
class SourceSpec:
    """One source of a blend, as written in YAML."""

    name: str
    """registered source name: hh_rlhf, shp, tldr, comparisons, rm_static, prompts, json, synthetic"""
    path: Optional[str] = None
    """local file (.jsonl, .json, .csv, .parquet)"""
    hub: Optional[str] = None
    """hub dataset name, loaded with datasets.load_dataset"""
    hub_split: str = "train"
    hub_subset: Optional[str] = None
    weight: float = 1.0
    """sampling weight of the training parts: 2.0 repeats every row twice, 0.5 keeps half"""
    options: dict = field(default_factory=dict)
    """keyword options of the normalizer (e.g. min_score_ratio for shp)"""
    skip_bad_rows: bool = False
    """count and skip invalid rows instead of stopping at the first one"""
    label: Optional[str] = None
    """name of this source in reports (defaults to name); also seeds its shuffle"""
    stages: Optional[list[str]] = None
    """parts this source feeds (default: every part its records support)"""

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass
class Blend:
    """A list of sources with weights and the seeded split of each into per-stage parts."""

    sources: list[SourceSpec]
    seed: int = 1234
    """seed of the split and of the weighting; the same seed gives the same parts on any machine"""
    split: Union[list[float], dict[str, float]] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    """relative sizes of the parts: three numbers for sft, reward and ppo (DeepSpeed-Chat's --data_split),
    or named parts, e.g. {sft: 2, pairs: 4, prompts: 4}"""
    eval_fraction: float = 0.05
    """share of each source held out for evaluation, before the stage split"""
    max_eval: Optional[int] = None
    """cap on eval rows per source (keeps validation cheap on big sources)"""

    def __post_init__(self):
        self.sources = [SourceSpec(**s) if isinstance(s, dict) else s for s in self.sources]
        if not self.sources:
            raise ValueError("a blend needs at least one source")
        named = dict(self.split) if isinstance(self.split, dict) else dict(zip(STAGES, self.split))
        if isinstance(self.split, list) and len(self.split) != 3:
            raise ValueError(f"split must be three numbers (sft, reward, ppo) or named parts, got {self.split}")
        if not named or min(named.values()) < 0 or sum(named.values()) <= 0 or "eval" in named:
            raise ValueError(
                f"split: parts need non-negative sizes summing above 0 (and no part named eval), got {self.split}"
            )
        self.parts = named
        for s in self.sources:
            if s.stages is not None and not set(s.stages) <= set(named):
                raise ValueError(
                    f"source {s.name!r}: stages must be among the split's parts {list(named)}, got {s.stages}"
                )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        labels = [s.label or s.name for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two sources share a label in {labels}; give each a distinct 'label'")
        self._loaded: Optional[list[LoadResult]] = None
        # (source, part name, train/eval, kind) -> records of that part the kind could not use (no pair...)
        self.unsupported: dict[tuple, int] = {}

    def load(self) -> list[LoadResult]:
        if self._loaded is None:
            self._loaded = [
                load_source(s.name, s.path, s.hub, s.hub_split, s.hub_subset, s.options, s.skip_bad_rows, s.label)
                for s in self.sources
            ]
        return self._loaded

    def _parts(self, spec: SourceSpec, result: LoadResult) -> dict[str, list[dict]]:
        """Cut one source's records into eval + per-stage parts (disjoint, covering every record)."""
        records = result.records
        rng = np.random.Generator(np.random.PCG64([self.seed, zlib.crc32(result.name.encode())]))
        order = rng.permutation(len(records))
        n_eval = int(round(len(records) * self.eval_fraction))
        if self.max_eval is not None:
            n_eval = min(n_eval, self.max_eval)
        parts = {"eval": [records[i] for i in order[:n_eval]]}
        rest = order[n_eval:]
        names = list(self.parts)
        allowed = spec.stages or [s for s in names if records and supports(records[0], s)]
        ratios = np.array([self.parts[s] if s in allowed else 0.0 for s in names])
        if ratios.sum() == 0:
            ratios = np.array([1.0 if s in allowed else 0.0 for s in names])
        bounds = np.round(np.cumsum(ratios) / max(ratios.sum(), 1e-12) * len(rest)).astype(int)
        for stage, lo, hi in zip(names, [0, *bounds[:-1]], bounds):
            parts[stage] = [records[i] for i in rest[lo:hi]]
        return parts

    def _weighted(self, records: list[dict], weight: float, key: int) -> list[dict]:
        whole, frac = int(weight), weight - int(weight)
        rng = np.random.Generator(np.random.PCG64([self.seed, key, 1]))
        extra = [records[i] for i in rng.permutation(len(records))[: int(round(frac * len(records)))]]
        return records * whole + extra

    def records(self, name: str, part: str = "train", kind: Optional[str] = None) -> list[dict]:
        """Records of the part ``name`` (or the shared held-out part with ``part='eval'``), seen through the
        view of ``kind`` (sft, reward or ppo; default: the part's name) and shuffled with the seed. Records
        that lack what the kind needs are left out and counted in ``unsupported``."""
        kind = kind or name
        if kind not in STAGES or name not in self.parts:
            raise ValueError(f"data part {name!r} as {kind!r}: parts are {list(self.parts)}, kinds {list(STAGES)}")
        out: list[dict] = []
        for spec, result in zip(self.sources, self.load()):
            parts = self._parts(spec, result)
            chosen = parts["eval"] if part == "eval" else parts[name]
            kept = [r for r in chosen if supports(r, kind)]
            if len(kept) < len(chosen):
                self.unsupported[(result.name, name, part, kind)] = len(chosen) - len(kept)
            if part == "train":
                kept = self._weighted(kept, spec.weight, zlib.crc32(result.name.encode()))
            out.extend(view(r, kind) for r in kept)
        # The held-out part is one list for every stage (key 0), so stages evaluate the same records.
        key = 0 if part == "eval" else (STAGES.index(name) if name in STAGES else zlib.crc32(name.encode()))
        rng = np.random.Generator(np.random.PCG64([self.seed, key, part == "eval"]))
        return [out[i] for i in rng.permutation(len(out))]

    def report(self) -> list[dict]:
        """Per source: rows read, kept, dropped by reason, and the size of each part."""
        rows = []
        for spec, result in zip(self.sources, self.load()):
            parts = self._parts(spec, result)
            rows.append({**result.summary(), "parts": {k: len(v) for k, v in parts.items()}})
        return rows
