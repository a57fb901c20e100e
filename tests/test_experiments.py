"""Experiments: every overlay parses on its base, the runner reuses stages and writes its comparison."""

import json
from pathlib import Path

import pytest
import yaml

from rlhf_lit.apps.cli import lightning_cli
from rlhf_lit.apps.experiments import PIPELINE_KEYS, experiment_files, pipeline_config, question, run_study, with_logger
from rlhf_lit.apps.pipeline import from_args
from rlhf_lit.apps.recipes import beside, resolve_pipeline_paths

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent for p in (REPO / "experiments").glob("*/study.yaml"))
EXPERIMENTS = [(study, name, stage, f) for study in STUDIES for name, stage, f in experiment_files(study)]


@pytest.mark.parametrize("study,name,stage,path", EXPERIMENTS, ids=[f"{s.name}/{n}" for s, n, _, _ in EXPERIMENTS])
def test_experiment_overlay_parses_on_its_base(study, name, stage, path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = path.read_text()
    assert len(text.splitlines()) <= 20 and question(path).startswith("Q:")
    assert "logger" not in text  # the logger block lives once, in the study's base
    overlay = resolve_pipeline_paths(yaml.safe_load(text), path.parent)
    spec = yaml.safe_load((study / "study.yaml").read_text())
    base_path = Path(beside(spec["base"], study))
    base = resolve_pipeline_paths(yaml.safe_load(base_path.read_text()), base_path.parent)
    if not (PIPELINE_KEYS & set(overlay)):  # a stage overlay composes with the stage's own base config
        config = next(s["config"] for s in base["stages"] if s["name"] == stage)
        lightning_cli(["--config", config, "--config", str(path)], run=False)
    merged = tmp_path / "pipeline.yaml"
    cfg = with_logger(pipeline_config(base, stage, overlay), spec.get("logger"), name, 0)
    stages = [s["name"] for s in cfg["stages"]]  # a pipeline may have no reward stage, or a DPO one
    for entry in cfg["stages"]:  # the study's one W&B block, named after the experiment and stage
        s = entry["name"]
        wandb = [x for x in entry["overrides"]["trainer"]["logger"] if x["class_path"].endswith("WandbLogger")]
        assert wandb[0]["init_args"]["name"] == f"{name}/{s}/seed0" and s in wandb[0]["init_args"]["tags"]
    merged.write_text(yaml.safe_dump(cfg))
    pipe = from_args(["--config", str(merged), f"--run_dir={tmp_path / 'run'}"])
    for s in stages:
        resolved = tmp_path / f"{s}.yaml"
        resolved.write_text(yaml.safe_dump(pipe.stage_config(s)))
        lightning_cli(["--config", str(resolved)], run=False)


def test_runner_reuses_stages_and_writes_table_and_plot(tmp_path, monkeypatch):
    from conftest import short_recipe

    monkeypatch.chdir(REPO)
    base = short_recipe(tmp_path, ppo_steps=3)
    study = tmp_path / "study"
    (study / "ppo").mkdir(parents=True)
    (study / "reward").mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump({"base": str(base), "seeds": [0], "out": str(tmp_path / "out")}))
    (study / "ppo" / "beta.yaml").write_text(
        "# Q: a stronger KL?\nmodel: {init_args: {kl: {class_path: "
        "rlhf_lit.math.kl_control.FixedKL, init_args: {value: 0.3}}}}\n"
    )
    (study / "reward" / "suffix.yaml").write_text(
        "# Q: the divergent-suffix loss?\nmodel: {init_args: {loss: divergent_suffix}}\n"
    )
    (study / "dpo").mkdir()  # a pipeline overlay: the base's sft stage, then DPO instead of reward + PPO
    dpo_stage = {
        "name": "dpo",
        "config": str(REPO / "configs/dpo/tiny.yaml"),
        "overrides": {"trainer": {"max_steps": 3}},
        "inputs": {
            "model.init_args.model": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": "{sft}"}}
        },
        "policies": {"dpo": ""},
    }
    (study / "dpo" / "ipo.yaml").write_text("# Q: IPO instead?\n" + yaml.safe_dump({"stages": ["sft", dpo_stage]}))
    out = run_study(study)
    base_run, ppo_run, rm_run = out / "base/seed0", out / "ppo__beta/seed0", out / "reward__suffix/seed0"
    # the PPO variant reused the base run's SFT and reward stages; the reward variant only its SFT
    assert (
        "FixedKL" in (ppo_run / "ppo/config.yaml").read_text()
        and "value: 0.3" in (ppo_run / "ppo/config.yaml").read_text()
    )
    assert (
        not (ppo_run / "reward/checkpoints").exists()
        or (ppo_run / "reward/DONE").read_text() == (base_run / "reward/DONE").read_text()
    )
    assert (rm_run / "sft/DONE").read_text() == (base_run / "sft/DONE").read_text()
    assert "divergent_suffix" in (rm_run / "reward/config.yaml").read_text()
    dpo_run = out / "dpo__ipo/seed0"
    assert (dpo_run / "sft/DONE").read_text() == (base_run / "sft/DONE").read_text()
    assert not (dpo_run / "reward").exists() and not (dpo_run / "ppo").exists()
    table = (out / "results.md").read_text()
    assert "| base |" in table and "| ppo/beta | Q: a stronger KL? |" in table and "| reward/suffix |" in table
    assert "| dpo/ipo | Q: IPO instead? |" in table
    assert (out / "reward_vs_kl.png").stat().st_size > 10_000
    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows["ppo/beta"][0]["ppo"]["kl"], float)  # k1 estimate: may dip below 0 near the reference
    final = rows["dpo/ipo"][0]["final"]  # the DPO policy against the same SFT policy on the same prompts
    assert final["policy"] == "dpo" and {"gold_reward_mean", "kl", "win_rate_vs_sft_gold"} <= set(final)


def test_seed_varies_training_keeps_the_split_and_models_are_evaluated_beside_the_stages(tmp_path, monkeypatch):
    """``seed_varies: [training]`` seeds every stage and keeps the blend (the same held-out problems);
    ``evaluation.models`` adds a policy no stage trains (the starting checkpoint), known by its path."""
    import rlhf_lit.apps.experiments as experiments
    from rlhf_lit.apps.pipeline import EvalPlan, Pipeline
    from rlhf_lit.errors import InputError

    seen = []

    class Recorded:  # the pipeline a seed would run, read back from the file the runner wrote
        def __init__(self, argv):
            seen.append(yaml.safe_load(Path(argv[1]).read_text()))

        def run(self):
            return {}

    monkeypatch.setattr(experiments, "from_args", Recorded)
    base = {"blend": {"seed": 7}, "stages": [{"name": "ppo", "config": "x.yaml"}]}
    experiments.run_pipeline(base, tmp_path / "a", 2, ("training",))
    experiments.run_pipeline(base, tmp_path / "b", 2)
    assert seen[0]["blend"]["seed"] == 7 and seen[0]["stages"][0]["overrides"]["seed_everything"] == 2
    assert seen[1]["blend"]["seed"] == 9 and "overrides" not in seen[1]["stages"][0]
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump({"base": "x.yaml", "seed_varies": ["data"]}))
    (study / "x.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ValueError, match="seed_varies: give some of blend, training; got \\['data'\\]"):
        run_study(study)

    stages = [{"name": "ppo", "config": "x.yaml", "policies": {"grpo": "actor"}}]
    pipe = Pipeline(str(tmp_path / "run"), {}, stages, evaluation=EvalPlan(models={"start": "models/m"}))
    assert pipe.policies() == {"start": "models/m", "grpo": str(tmp_path / "run/ppo/export/actor")}
    assert pipe.done_stamp("models/m") == "model models/m"
    for clash in ("ppo", "grpo"):
        with pytest.raises(InputError, match=f"evaluation.models: {clash} already names"):
            Pipeline(str(tmp_path / "run"), {}, stages, evaluation=EvalPlan(models={clash: "models/m"}))
    cfg = resolve_pipeline_paths({"evaluation": {"models": {"start": "x.yaml", "hub": "org/name"}}}, study)
    assert cfg["evaluation"]["models"] == {"start": str(study / "x.yaml"), "hub": "org/name"}


TINY_STUDIES = [s for s in STUDIES if s.name != "smollm2_vllm"]  # that one is the real model: its own tests


@pytest.mark.slow
@pytest.mark.parametrize("study", TINY_STUDIES, ids=lambda p: p.name)
def test_every_experiment_runs_a_few_steps_on_the_tiny_model(study, tmp_path, monkeypatch):
    import shutil

    from conftest import short_recipe

    monkeypatch.chdir(REPO)
    small = tmp_path / "study"
    for folder in (d for d in study.iterdir() if d.is_dir() and d.name != "results"):
        shutil.copytree(folder, small / folder.name)
    spec = yaml.safe_load((study / "study.yaml").read_text())
    base = short_recipe(tmp_path, ppo_steps=2, base=Path(beside(spec["base"], study)))
    (small / "study.yaml").write_text(yaml.safe_dump({"base": str(base), "seeds": [0], "out": str(tmp_path / "out")}))
    out = run_study(small)
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"base", *(name for name, _, _ in experiment_files(study))}
    for name, (summary,) in rows.items():
        assert isinstance(summary["final"]["gold_reward_mean"], float), name  # PPO's actor or the DPO policy
