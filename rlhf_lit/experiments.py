"""``rlhf-lit experiments run STUDY_DIR``: run a study's ablations on the pipeline and compare them.

A study directory holds ``study.yaml`` (the base pipeline config, seeds, run directory) and one small
YAML per experiment in a sub-folder named after the first stage it changes (``sft/``, ``reward/``,
``ppo/``). An experiment file is either a stage overlay, composable with that stage's base config
(``rlhf-lit fit --config configs/ppo/tiny.yaml --config experiments/<study>/ppo/x.yaml``), or, when it
has a top-level ``blend:``, a pipeline overlay (``rlhf-lit pipeline --config base.yaml --config x.yaml``).
Its first line is a comment stating the question it answers.

Stages before the one an experiment changes are reused from the study's base run of the same seed
(every PPO variant shares one SFT and one reward run). The comparison is written as ``results.md``
(mean ± std over seeds) and ``reward_vs_kl.png`` in the study's output directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from rlhf_lit.pipeline import STAGES, deep_merge, from_args
from rlhf_lit.recipes import beside, resolve_pipeline_paths

COLUMNS = [  # (header, summary section, key)
    ("gold (PPO)", "ppo", "gold_reward_mean"),
    ("gold (PPO EMA)", "ppo_ema", "gold_reward_mean"),
    ("gold gain / SFT std", "ppo", "gold_gain_in_sft_std"),
    ("RM score (PPO)", "ppo", "rm_score_mean"),
    ("KL (PPO)", "ppo", "kl"),
    ("KL (EMA)", "ppo_ema", "kl"),
    ("RM acc. vs gold", "reward", "heldout_accuracy"),
    ("gold (SFT)", "sft", "gold_reward_mean"),
    ("PPO wall s", "ppo", "wall_s"),
]


def experiment_files(study: Path) -> list[tuple[str, str, Path]]:
    """(name, first changed stage, file) for every experiment YAML, in stage order then name."""
    out = []
    for stage in STAGES:
        for f in sorted((study / stage).glob("*.yaml")):
            out.append((f"{stage}/{f.stem}", stage, f))
    return out


def question(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    if not first.startswith("#"):
        raise ValueError(f"{path}: the first line must be a comment stating the question the experiment answers")
    return first.lstrip("# ").strip()


PIPELINE_KEYS = {
    "run_dir",
    "blend",
    "tokenizer",
    "evaluation",
    "reward_init_from_sft",
    "checkpoint_every_n_steps",
    *STAGES,
}


def pipeline_config(base: dict, stage: str, overlay: dict) -> dict:
    """The base pipeline config with an experiment applied: a pipeline overlay is merged at the top,
    a stage overlay into that stage's overrides (as a later ``--config`` of the stage would be)."""
    if set(overlay) & PIPELINE_KEYS:
        return deep_merge(base, overlay)
    plan = base[stage]
    return deep_merge(base, {stage: {"overrides": deep_merge(plan.get("overrides") or {}, overlay)}})


def with_logger(cfg: dict, logger: list | None, name: str, seed: int) -> dict:
    """The study's one logger block given to every stage of a run: W&B runs are named after the
    experiment and seed and tagged with the stage (the experiment files carry no logger of their own)."""
    if not logger:
        return cfg
    out = dict(cfg)
    for stage in STAGES:
        loggers = []
        for spec in logger:
            spec = deep_merge(spec, {})
            if spec["class_path"].endswith("WandbLogger"):
                init = spec.setdefault("init_args", {})
                init.update(name=f"{name}/{stage}/seed{seed}", tags=[*init.get("tags", []), stage, name])
            loggers.append(spec)
        plan = out.get(stage)
        if plan:  # a pipeline may leave a stage out (e.g. no reward stage with a rule checker)
            out[stage] = {
                **plan,
                "overrides": deep_merge(plan.get("overrides") or {}, {"trainer": {"logger": loggers}}),
            }
    return out


def reuse_stages(base_run: Path, run: Path, first_changed: str) -> None:
    """Copy the finished stages before ``first_changed`` (and the tokenizer) from the base run."""
    run.mkdir(parents=True, exist_ok=True)
    keep = STAGES[: STAGES.index(first_changed)]
    for item in ["tokenizer", *keep]:
        src = base_run / item
        if src.exists() and not (run / item).exists():
            shutil.copytree(src, run / item)
    summary = json.loads((base_run / "summary.json").read_text())
    reused = {k: v for k, v in summary.items() if k in keep}
    for k in reused.get("sft", {}).copy():  # policy metrics are recomputed against this run's reward model
        if k not in ("eval_loss", "wall_s", "final_metrics"):
            reused["sft"].pop(k)
    if not (run / "summary.json").exists():
        (run / "summary.json").write_text(json.dumps(reused, indent=2))


def run_pipeline(cfg: dict, run_dir: Path, seed: int) -> dict:
    cfg = deep_merge(cfg, {"run_dir": str(run_dir)})
    cfg["blend"] = deep_merge(cfg["blend"], {"seed": cfg["blend"].get("seed", 0) + seed})
    tok = cfg.get("tokenizer", {}).get("init_args", {})
    if "save_dir" in tok:
        tok["save_dir"] = str(run_dir / "tokenizer")
    path = run_dir / "pipeline.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return from_args(["--config", str(path)]).run()


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def compare(rows: dict[str, list[dict]], questions: dict[str, str], columns=None) -> str:
    columns = columns or COLUMNS
    lines = [
        "| experiment | question | seeds | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name, summaries in rows.items():
        cells = [fmt([s[sec][key] for s in summaries if key in s.get(sec, {})]) for _, sec, key in columns]
        lines.append(
            f"| {name} | {questions.get(name, 'the base recipe')} | {len(summaries)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def run_study(
    study: Path, seeds: list[int] | None = None, out: Path | None = None, only: list[str] | None = None
) -> Path:
    spec = yaml.safe_load((study / "study.yaml").read_text())
    seeds = seeds if seeds is not None else spec.get("seeds", [0])
    out = out or Path(spec.get("out", f"runs/studies/{study.name}"))
    base_path = Path(beside(spec["base"], study.resolve()))  # beside study.yaml, else the working directory
    base = resolve_pipeline_paths(yaml.safe_load(base_path.read_text()), base_path.resolve().parent)
    base = deep_merge(base, spec.get("overrides") or {})
    experiments = [e for e in experiment_files(study) if not only or e[0] in only]
    questions = {name: question(f) for name, _, f in experiments}
    if spec.get("base_question"):
        questions["base"] = spec["base_question"]
    rows: dict[str, list[dict]] = {"base": []}
    logger = spec.get("logger")
    for seed in seeds:
        rows["base"].append(run_pipeline(with_logger(base, logger, "base", seed), out / "base" / f"seed{seed}", seed))
        for name, stage, f in experiments:
            run = out / name.replace("/", "__") / f"seed{seed}"
            reuse_stages(out / "base" / f"seed{seed}", run, stage)
            cfg = pipeline_config(base, stage, yaml.safe_load(f.read_text()) or {})
            rows.setdefault(name, []).append(run_pipeline(with_logger(cfg, logger, name, seed), run, seed))
    publish = Path(spec["results"]) if spec.get("results") else None
    if only and publish is not None and (publish / "results.json").exists():
        # --only re-runs some rows: the others are kept from the committed results, in their order
        kept = json.loads((publish / "results.json").read_text())
        rows = {**kept, **rows}
        questions = {**{n: question(f) for n, _, f in experiment_files(study)}, **questions}
    table = compare(rows, questions, [tuple(c) for c in spec["columns"]] if spec.get("columns") else None)
    (out / "results.md").write_text(
        f"# {study.name}: results\n\nRegenerate: `rlhf-lit experiments run {study}`\n\n{table}"
    )
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(out, list(rows), seeds[0])
    from rlhf_lit.plots import final_vs_kl

    final_vs_kl(rows, out / "final_vs_kl.png", spec.get("score_label", "gold reward (held-out mean)"), study.name)
    if publish is not None:  # the small artefacts that are committed beside the study
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "reward_vs_kl.png", "final_vs_kl.png"):
            shutil.copy(out / name, publish / name)
    print(table)
    return out


def plot(out: Path, names: list[str], seed: int) -> Path:
    from rlhf_lit.plots import reward_vs_kl

    runs = {}
    for name in names:
        logs = sorted((out / name.replace("/", "__") / f"seed{seed}" / "ppo").rglob("metrics.csv"))
        if logs:
            runs[name] = logs[-1]
    return reward_vs_kl(runs, out / "reward_vs_kl.png", title=f"{out.name}: reward against KL (seed {seed})")


def main(argv: list[str]) -> int:
    # Three flags around a study directory; the experiments themselves are YAML configs.
    p = argparse.ArgumentParser(
        prog="rlhf-lit experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("action", choices=["run"])
    p.add_argument("study", help="study directory with study.yaml, e.g. experiments/gold_task")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the study's)")
    p.add_argument("--out", help="output directory (default: the study's, or runs/studies/<name>)")
    p.add_argument("--only", nargs="+", help="run only these experiments (e.g. ppo/kl_fixed_0.2)")
    a = p.parse_args(argv)
    study = Path(a.study)
    if not (study / "study.yaml").exists():
        print(f"rlhf-lit experiments: error: {study / 'study.yaml'} does not exist", file=sys.stderr)
        return 1
    try:
        run_study(study, a.seeds, Path(a.out) if a.out else None, a.only)
    except ValueError as e:
        print(f"rlhf-lit experiments: error: {e}", file=sys.stderr)
        return 1
    return 0
