"""What a pipeline YAML says: its stages (:class:`StagePlan`), its evaluation (:class:`EvalPlan`), and
the config merging rules (a changed ``class_path`` brings its own ``init_args``; ``recipe:`` names and
paths resolved beside the YAML)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from rlhf_lit.errors import InputError

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.-]+)((?:/[A-Za-z0-9_.-]+)*)\}")


@dataclass
class StagePlan:
    """One stage of a pipeline: a stage config, overrides merged into it, and what earlier stages feed it."""

    name: str
    """the stage's name: its folder in run_dir, its summary section, what later stages refer to"""
    config: str
    """path of the stage's base YAML (e.g. configs/sft/tiny.yaml)"""
    overrides: dict = field(default_factory=dict)
    """nested keys merged over the base (e.g. {trainer: {max_epochs: 3}})"""
    inputs: dict = field(default_factory=dict)
    """dotted config keys set from earlier stages' exports: "{sft}" in a value is the sft stage's export
    folder, "{ppo/actor}" a sub-folder (e.g. model.init_args.actor.init_args.path: "{sft}")"""
    policies: dict = field(default_factory=dict)
    """summary section -> export sub-folder ("" the export itself) evaluated as a policy on held-out prompts"""
    reward_model: bool = False
    """its export is a reward model: accuracy on its held-out pairs, and the proxy judge of the policies"""


@dataclass
class EvalPlan:
    """What the pipeline measures on held-out data after the stages."""

    prompts: int = 200
    """held-out prompts used to evaluate the policies"""
    gold: Optional[str] = None
    """import path of a gold reward function (prompt, response, **columns) -> float, when the task has one"""
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    reward_pairs: Optional[int] = None
    """held-out pairs scored for the reward model's accuracy (None: all of them)"""
    examples: int = 3
    """held-out prompts whose responses each policy's summary keeps (before/after answers)"""
    baseline: Optional[str] = None
    """the policy the others are compared with (KL reference, win rate); default: the first policy"""
    prompts_from: Optional[str] = None
    """the stage whose held-out records give the prompts (default: the last stage)"""
    models: dict = field(default_factory=dict)
    """policies no stage trains, evaluated beside the stages' exports: name -> model folder or hub name
    (e.g. {start: models/smollm2-135m-instruct}, the checkpoint an RL stage starts from without SFT)"""


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` key by key; a ``class_path`` that changes brings its own init_args
    (the old class's arguments may not fit the new class)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        switch = (
            isinstance(v, dict)
            and isinstance(old, dict)
            and v.get("class_path", old.get("class_path")) != old.get("class_path")
        )
        out[k] = (
            deep_merge(old, v) if isinstance(v, dict) and isinstance(old, dict) and not switch else copy.deepcopy(v)
        )
    return out


def spec(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def set_key(cfg: dict, dotted: str, value) -> None:
    """Merge ``value`` at a dotted key of a nested config (as an override of that key would be)."""
    *parents, last = dotted.split(".")
    node = cfg
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise InputError(f"inputs: {dotted}: {k} is not a mapping in the stage config")
    old = node.get(last)
    node[last] = deep_merge({"x": old}, {"x": value})["x"] if isinstance(old, dict) else value  # class switch rule


def configs_resolved(argv: list[str]) -> list[str]:
    """``--config`` files with ``recipe:`` names expanded and the paths inside each YAML (stage configs,
    data files, tokenizer) resolved beside that YAML, passed on as YAML text: the pipeline runs the same
    from any working directory."""
    from rlhf_lit.apps.recipes import expand_config_args, resolve_pipeline_paths

    args, out, i = expand_config_args(argv), [], 0
    while i < len(args):
        arg = args[i]
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and Path(path).is_file():
            cfg = yaml.safe_load(Path(path).read_text()) or {}
            if isinstance(cfg, dict):
                path = yaml.safe_dump(resolve_pipeline_paths(cfg, Path(path).resolve().parent), sort_keys=False)
            out += ["--config", path]
            i += 2 if arg == "--config" else 1
            continue
        out.append(arg)
        i += 1
    return out
