"""Blends of sources with weights, split deterministically into disjoint parts per RLHF stage.

As DeepSpeed-Chat's ``--data_split 2,4,4``: each source's rows are shuffled with a seed and cut into
an SFT part, a reward part and a PPO part (plus a held-out eval part), so no stage trains on another
stage's rows. Numpy's PCG64 generator makes the split the same on every machine for the same seed.
Pure Python/numpy: no lightning, deepspeed or wandb.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from datamodules.sources import LoadResult, load_source

STAGES = ("sft", "reward", "ppo")


def supports(record: dict, stage: str) -> bool:
    """Whether a record has what ``stage`` needs: SFT a response (or a chosen one), reward a pair."""
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
    """stages this source feeds (default: every stage its records support)"""

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.stages is not None and not set(self.stages) <= set(STAGES):
            raise ValueError(f"source {self.name!r}: stages must be among {STAGES}, got {self.stages}")


@dataclass
class Blend:
    """A list of sources with weights and the seeded split of each into per-stage parts."""

    sources: list[SourceSpec]
    seed: int = 1234
    """seed of the split and of the weighting; the same seed gives the same parts on any machine"""
    split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    """relative sizes of the SFT, reward and PPO parts (DeepSpeed-Chat's --data_split)"""
    eval_fraction: float = 0.05
    """share of each source held out for evaluation, before the stage split"""
    max_eval: Optional[int] = None
    """cap on eval rows per source (keeps validation cheap on big sources)"""

    def __post_init__(self):
        self.sources = [SourceSpec(**s) if isinstance(s, dict) else s for s in self.sources]
        if not self.sources:
            raise ValueError("a blend needs at least one source")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError(f"split must be three non-negative numbers (sft, reward, ppo), got {self.split}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        labels = [s.label or s.name for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two sources share a label in {labels}; give each a distinct 'label'")
        self._loaded: Optional[list[LoadResult]] = None

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
        allowed = spec.stages or [s for s in STAGES if records and supports(records[0], s)]
        ratios = np.array([self.split[i] if s in allowed else 0.0 for i, s in enumerate(STAGES)])
        if ratios.sum() == 0:
            ratios = np.array([1.0 if s in allowed else 0.0 for s in STAGES])
        bounds = np.round(np.cumsum(ratios) / max(ratios.sum(), 1e-12) * len(rest)).astype(int)
        for stage, lo, hi in zip(STAGES, [0, *bounds[:-1]], bounds):
            parts[stage] = [records[i] for i in rest[lo:hi]]
        return parts

    def _weighted(self, records: list[dict], weight: float, key: int) -> list[dict]:
        whole, frac = int(weight), weight - int(weight)
        rng = np.random.Generator(np.random.PCG64([self.seed, key, 1]))
        extra = [records[i] for i in rng.permutation(len(records))[: int(round(frac * len(records)))]]
        return records * whole + extra

    def records(self, stage: str, part: str = "train") -> list[dict]:
        """Records of ``stage`` (its training part, or the shared held-out part with ``part='eval'``),
        seen through the stage's view and shuffled with the seed."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        out: list[dict] = []
        for spec, result in zip(self.sources, self.load()):
            parts = self._parts(spec, result)
            chosen = parts["eval"] if part == "eval" else parts[stage]
            chosen = [r for r in chosen if supports(r, stage)]
            if part == "train":
                chosen = self._weighted(chosen, spec.weight, zlib.crc32(result.name.encode()))
            out.extend(view(r, stage) for r in chosen)
        rng = np.random.Generator(np.random.PCG64([self.seed, STAGES.index(stage), part == "eval"]))
        return [out[i] for i in rng.permutation(len(out))]

    def report(self) -> list[dict]:
        """Per source: rows read, kept, dropped by reason, and the size of each part."""
        rows = []
        for spec, result in zip(self.sources, self.load()):
            parts = self._parts(spec, result)
            rows.append({**result.summary(), "parts": {k: len(v) for k, v in parts.items()}})
        return rows
