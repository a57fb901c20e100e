"""``rlhf-lit experiments run STUDY_DIR``: run a study's ablations on the pipeline and compare them.

A study directory holds ``study.yaml`` (the base pipeline config, seeds, run directory) and one small
YAML per experiment in sub-folders. An experiment file is either a stage overlay of the base stage named
like its folder (``ppo/x.yaml``), composable with that stage's config (``rlhf-lit fit --config
configs/ppo/tiny.yaml --config experiments/<study>/ppo/x.yaml``), or, with top-level pipeline keys
(``blend:``, ``stages:`` ...), a pipeline overlay: ``stages: [sft, {name: dpo, config: ...}]`` keeps the
base's sft stage and adds a DPO stage. Its first line is a comment stating the question it answers.

The leading stages an experiment runs exactly as the base does are reused from the study's base run of
the same seed (every PPO variant shares one SFT and one reward run; DPO shares the SFT run). The
comparison is written as ``results.md`` (mean ± std over seeds), ``reward_vs_kl.png`` (training curves)
and ``final_vs_kl.png`` (held-out score against KL, every seed) in the study's output directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from rlhf_lit.apps.pipeline import deep_merge, from_args
from rlhf_lit.apps.recipes import beside, resolve_pipeline_paths

COLUMNS = [  # (header, summary section, key); "final" is each run's last policy (PPO's actor, DPO's policy...)
    ("gold (final policy)", "final", "gold_reward_mean"),
    ("gold (PPO EMA)", "ppo_ema", "gold_reward_mean"),
    ("gold gain / SFT std", "final", "gold_gain_in_sft_std"),
    ("win rate vs SFT", "final", "win_rate_vs_sft_gold"),
    ("RM score (final)", "final", "rm_score_mean"),
    ("KL (final)", "final", "kl"),
    ("KL (EMA)", "ppo_ema", "kl"),
    ("RM acc. vs gold", "reward", "heldout_accuracy"),
    ("gold (SFT)", "sft", "gold_reward_mean"),
    ("final stage wall s", "final", "wall_s"),
]


def experiment_files(study: Path, order: list[str] | None = None) -> list[tuple[str, str, Path]]:
    """(name, folder, file) for every experiment YAML: folders named like a base stage first, in the
    base's order (default sft, reward, ppo), then the others by name; files by name."""
    order = order or ["sft", "reward", "ppo"]
    folders = sorted((d for d in study.iterdir() if d.is_dir() and any(d.glob("*.yaml"))), key=lambda d: d.name)
    folders.sort(key=lambda d: order.index(d.name) if d.name in order else len(order))
    return [(f"{d.name}/{f.stem}", d.name, f) for d in folders for f in sorted(d.glob("*.yaml"))]


def question(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    if not first.startswith("#"):
        raise ValueError(f"{path}: the first line must be a comment stating the question the experiment answers")
    return first.lstrip("# ").strip()


PIPELINE_KEYS = {"run_dir", "blend", "tokenizer", "evaluation", "checkpoint_every_n_steps", "stages"}


def merge_stages(base: list[dict], over: list) -> list[dict]:
    """An overlay's stage list: a name alone is the base's stage of that name, a mapping with a base
    stage's name is merged into it, any other mapping is a new stage; the overlay's order is the run's."""
    by_name = {s["name"]: s for s in base}
    out = []
    for item in over:
        name = item if isinstance(item, str) else item.get("name")
        if isinstance(item, str) and name not in by_name:
            raise ValueError(f"stages: {name!r} is not a stage of the base pipeline ({', '.join(by_name)})")
        out.append(by_name[name] if isinstance(item, str) else deep_merge(by_name.get(name, {}), item))
    return out


def pipeline_config(base: dict, folder: str, overlay: dict) -> dict:
    """The base pipeline config with an experiment applied: a pipeline overlay (top-level pipeline keys) is
    merged at the top, its ``stages`` by :func:`merge_stages`; a stage overlay goes into the overrides of
    the base stage named like the experiment's folder (as a later ``--config`` of that stage would)."""
    if set(overlay) & PIPELINE_KEYS:
        out = deep_merge(
            {k: v for k, v in base.items() if k != "stages"}, {k: v for k, v in overlay.items() if k != "stages"}
        )
        out["stages"] = merge_stages(base["stages"], overlay["stages"]) if "stages" in overlay else base["stages"]
        return out
    names = [s["name"] for s in base["stages"]]
    if folder not in names:
        raise ValueError(f"experiments in {folder}/ overlay a stage named {folder!r}; the base has {', '.join(names)}")
    stages = [deep_merge(s, {"overrides": overlay}) if s["name"] == folder else s for s in base["stages"]]
    return {**base, "stages": stages}


def with_logger(cfg: dict, logger: list | None, name: str, seed: int) -> dict:
    """The study's one logger block given to every stage of a run: W&B runs are named after the
    experiment and seed and tagged with the stage (the experiment files carry no logger of their own)."""
    if not logger:
        return cfg
    stages = []
    for stage in cfg["stages"]:
        loggers = []
        for spec in logger:
            spec = deep_merge(spec, {})
            if spec["class_path"].endswith("WandbLogger"):
                init = spec.setdefault("init_args", {})
                init.update(
                    name=f"{name}/{stage['name']}/seed{seed}", tags=[*init.get("tags", []), stage["name"], name]
                )
            loggers.append(spec)
        stages.append(deep_merge(stage, {"overrides": {"trainer": {"logger": loggers}}}))
    return {**cfg, "stages": stages}


def shared_stages(base: dict, cfg: dict) -> list[str]:
    """The leading stages an experiment runs exactly as the base does (same data, tokenizer and stage
    entry): their base-run results are reused."""
    if any(base.get(k) != cfg.get(k) for k in ("blend", "tokenizer", "checkpoint_every_n_steps")):
        return []
    out = []
    for a, b in zip(base["stages"], cfg["stages"]):
        if a != b:
            break
        out.append(a["name"])
    return out


def reuse_stages(base_run: Path, run: Path, keep: list[str], sections: list[str]) -> None:
    """Copy the finished stages ``keep`` (and the tokenizer) from the base run, and their summary
    ``sections`` (policy metrics among them are recomputed by the run's evaluation)."""
    run.mkdir(parents=True, exist_ok=True)
    for item in ["tokenizer", *keep]:
        src = base_run / item
        if src.exists() and not (run / item).exists():
            shutil.copytree(src, run / item)
    summary = json.loads((base_run / "summary.json").read_text())
    if not (run / "summary.json").exists():
        (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k in sections}, indent=2))


SEED_VARIES = ("blend", "training")


def run_pipeline(cfg: dict, run_dir: Path, seed: int, varies: tuple = ("blend",)) -> dict:
    """Run one seed of a pipeline config. ``varies`` says what the seed changes: ``blend`` adds it to the
    blend's seed (another split and order of the rows, other held-out prompts), ``training`` sets every
    stage's ``seed_everything`` to it (initialisation, dropout, sampling; the same rows and held-out set)."""
    cfg = deep_merge(cfg, {"run_dir": str(run_dir)})
    if "blend" in varies:
        cfg["blend"] = deep_merge(cfg["blend"], {"seed": cfg["blend"].get("seed", 0) + seed})
    if "training" in varies:
        cfg["stages"] = [deep_merge(s, {"overrides": {"seed_everything": seed}}) for s in cfg["stages"]]
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

    def section(s: dict, sec: str) -> dict:  # rows from before the stage list kept PPO's policy under "ppo"
        return s.get(sec) or (s.get("ppo", {}) if sec == "final" else {})

    for name, summaries in rows.items():
        cells = [fmt([section(s, sec)[key] for s in summaries if key in section(s, sec)]) for _, sec, key in columns]
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
    order = [s["name"] for s in base["stages"]]
    experiments = [e for e in experiment_files(study, order) if not only or e[0] in only]
    questions = {name: question(f) for name, _, f in experiments}
    if spec.get("base_question"):
        questions["base"] = spec["base_question"]
    rows: dict[str, list[dict]] = {"base": []}
    logger = spec.get("logger")
    varies = tuple(spec.get("seed_varies", ["blend"]))
    if not varies or set(varies) - set(SEED_VARIES):
        raise ValueError(f"seed_varies: give some of {', '.join(SEED_VARIES)}; got {list(varies)}")
    for seed in seeds:
        base_run = out / "base" / f"seed{seed}"
        rows["base"].append(run_pipeline(with_logger(base, logger, "base", seed), base_run, seed, varies))
        for name, folder, f in experiments:
            run = out / name.replace("/", "__") / f"seed{seed}"
            overlay = resolve_pipeline_paths(yaml.safe_load(f.read_text()) or {}, f.resolve().parent)
            cfg = pipeline_config(base, folder, overlay)
            keep = shared_stages(base, cfg)
            sections = keep + [n for s in base["stages"] if s["name"] in keep for n in (s.get("policies") or {})]
            reuse_stages(base_run, run, keep, sections)
            rows.setdefault(name, []).append(run_pipeline(with_logger(cfg, logger, name, seed), run, seed, varies))
    publish = Path(spec["results"]) if spec.get("results") else None
    if only and publish is not None and (publish / "results.json").exists():
        # --only re-runs some rows: the others are kept from the committed results, in their order
        kept = json.loads((publish / "results.json").read_text())
        if "base" in kept and "base" not in only:  # the base ran for reuse only: its committed row stands
            rows.pop("base")
        rows = {**kept, **rows}
        questions = {**{n: question(f) for n, _, f in experiment_files(study, order)}, **questions}
    table = compare(rows, questions, [tuple(c) for c in spec["columns"]] if spec.get("columns") else None)
    (out / "results.md").write_text(
        f"# {study.name}: results\n\nRegenerate: `rlhf-lit experiments run {study}`\n\n{table}"
    )
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(out, list(rows), seeds[0])
    from rlhf_lit.apps.plots import final_vs_kl

    final_vs_kl(rows, out / "final_vs_kl.png", spec.get("score_label", "gold reward (held-out mean)"), study.name)
    if publish is not None:  # the small artefacts that are committed beside the study
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "reward_vs_kl.png", "final_vs_kl.png"):
            shutil.copy(out / name, publish / name)
    print(table)
    return out


def plot(out: Path, names: list[str], seed: int) -> Path:
    from rlhf_lit.apps.plots import reward_vs_kl

    runs = {}
    for name in names:  # every run's RL stage: the one whose log has a KL column
        for log in sorted((out / name.replace("/", "__") / f"seed{seed}").glob("*/logs/*/metrics.csv")):
            if "objective/kl" in log.read_text().partition("\n")[0]:
                runs[name] = log
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
    p.add_argument(
        "--only", nargs="+", help="run only these experiments (e.g. ppo/kl_fixed_0.2; base: the base recipe alone)"
    )
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
