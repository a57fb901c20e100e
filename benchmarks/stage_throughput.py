"""Throughput of the tiny offline recipes on this machine: SFT tokens/s, reward pairs/s, PPO prompts/s
and the split of a PPO step between generation, scoring and training.

    python benchmarks/stage_throughput.py [--json] [--steps 60] [--out runs/bench]

Runs configs/{sft,reward,ppo}/tiny.yaml through the pipeline's stage wiring (the same CLI as users,
CSV logging), drops the first ``--warmup`` steps and reports medians of the per-step figures the
modules log (tokens/s counts attended tokens only, not padding).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import yaml

for k, v in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}.items():
    os.environ.setdefault(k, v)

from rlhf_lit.apps.pipeline import Pipeline, StagePlan  # noqa: E402
from rlhf_lit.apps.recipes import resolve_pipeline_paths  # noqa: E402


def metrics(log_dir: Path) -> list[dict]:
    files = sorted(log_dir.rglob("metrics.csv"))
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def median(rows, key, warmup):
    vals = [float(r[key]) for r in rows if r.get(key)][warmup:]
    return statistics.median(vals) if vals else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    # The pipeline's own stage wiring (exports fed forward), with fixed step counts and no validation.
    fixed = {
        "trainer": {
            "max_steps": a.steps,
            "max_epochs": -1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        }
    }
    # The quickstart's stages and wiring on the tiny stage configs (its size overrides replaced by `fixed`).
    recipe = resolve_pipeline_paths(
        yaml.safe_load(Path("configs/pipeline/quickstart.yaml").read_text()), Path("configs/pipeline").resolve()
    )
    pipe = Pipeline(
        str(out),
        recipe["blend"],
        [StagePlan(**{**s, "overrides": fixed}) for s in recipe["stages"]],
        tokenizer={
            "class_path": "rlhf_lit.hf.tokenizer.TrainedBPE",
            "init_args": {"save_dir": str(out / "tokenizer"), "vocab_size": 600},
        },
    )
    rows, wall = {}, {}
    for stage in pipe.plans:
        t0 = time.perf_counter()
        pipe.run_stage(stage)
        wall[stage], rows[stage] = time.perf_counter() - t0, metrics(out / stage)
    sft_rows, rm_rows, ppo_rows = rows["sft"], rows["reward"], rows["ppo"]
    split = {k: median(ppo_rows, f"time/{k}_s", a.warmup) for k in ("generate", "score", "train")}
    total = sum(split.values())
    result = {
        "sft_tokens_per_s": median(sft_rows, "train/device/items_per_sec", a.warmup),  # ThroughputMonitor
        "sft_samples_per_s": median(sft_rows, "train/device/samples_per_sec", a.warmup),
        "reward_pairs_per_s": median(rm_rows, "train/device/samples_per_sec", a.warmup),
        "reward_tokens_per_s": median(rm_rows, "train/device/items_per_sec", a.warmup),
        "ppo_prompts_per_s": median(ppo_rows, "time/prompts_per_s", a.warmup),
        "ppo_time_split": {k: round(v / total, 3) for k, v in split.items()},
        "ppo_step_s": total,
        "wall_s": wall,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": os.environ["OMP_NUM_THREADS"],
    }
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'figure':<28}{'value':>12}")
    for k in (
        "sft_tokens_per_s",
        "sft_samples_per_s",
        "reward_pairs_per_s",
        "reward_tokens_per_s",
        "ppo_prompts_per_s",
    ):
        print(f"{k:<28}{result[k]:>12.1f}")
    print(f"{'ppo_step_s':<28}{result['ppo_step_s']:>12.4f}")
    for k, v in result["ppo_time_split"].items():
        print(f"{'ppo_share_' + k:<28}{v:>12.1%}")


if __name__ == "__main__":
    main()
