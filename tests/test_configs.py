"""Every YAML in configs/ (and every experiment overlay on its base) parses with LightningCLI(run=False)."""

from pathlib import Path

import pytest
import torch
import yaml

from rlhf_lit.apps.cli import lightning_cli

REPO = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "class_path" in (yaml.safe_load(p.read_text()).get("model") or {})
)
STRATEGIES = sorted((REPO / "configs/strategy").glob("*.yaml"))


CPU_OVERRIDES = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
]


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_stage_config_parses_and_instantiates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = yaml.safe_load(path.read_text())
    extra = []
    if cfg["trainer"].get("accelerator") == "gpu" and not torch.cuda.is_available():
        parse_only(path)  # the whole config, GPU strategy included, against the schema
        extra = CPU_OVERRIDES  # then build everything but the GPU trainer here
    cli = lightning_cli(["--config", str(path), "--trainer.logger=false", *extra], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert type(cli.model).__name__ in {"SFTModule", "RewardModule", "PPOModule", "DPOModule"}


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo"])
def test_strategy_overlays_compose_with_every_stage(stage, strategy, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = lightning_cli(
        ["--config", f"configs/{stage}/tiny.yaml", "--config", str(strategy), "--trainer.logger=false"], run=False
    )
    assert type(cli.trainer.strategy).__name__ == "DeepSpeedStrategy"
    assert cli.trainer.strategy.config["zero_optimization"]["stage"] in (1, 2, 3)


def parse_only(path):
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class ParseOnly(LightningCLI):
        def instantiate_classes(self):
            pass

    cli = ParseOnly(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(path)],
        run=False,
        auto_configure_optimizers=False,
    )
    assert cli.config.trainer.strategy is not None


def test_unknown_key_and_wrong_type_are_one_line_errors(tmp_path, capsys):
    from rlhf_lit.apps.cli import main

    base = yaml.safe_load((REPO / "configs/sft/tiny.yaml").read_text())
    base["model"]["init_args"]["rouge_sampels"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base))
    assert main(["fit", "--config", str(bad)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf-lit")]
    assert len(err) == 1 and "rouge_sampels" in err[0]
    base["model"]["init_args"].pop("rouge_sampels")
    base["model"]["init_args"]["rouge_samples"] = "many"
    bad.write_text(yaml.safe_dump(base))
    assert main(["fit", "--config", str(bad)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf-lit")]
    assert len(err) == 1 and "rouge_samples" in err[0]


@pytest.mark.parametrize("path", sorted((REPO / "configs/pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_pipeline_configs_parse_and_resolve_stage_configs(path, monkeypatch, tmp_path):
    from rlhf_lit.apps.pipeline import from_args

    monkeypatch.chdir(tmp_path)  # another directory: paths in the YAML are looked up beside it
    pipe = from_args(["--config", str(path), f"--run_dir={tmp_path}"])
    # a start policy (the first stage's export, or a checkpoint of evaluation.models) and a trained one
    assert (pipe.stages[0].policies or pipe.evaluation.models) and any(
        p.policies for p in pipe.stages[1:] or pipe.stages
    )
    for stage in pipe.plans:
        assert Path(pipe.plans[stage].config).is_file()
        cfg = pipe.stage_config(stage)
        assert cfg["data"]["init_args"]["blend"] == pipe.blend
        exports = [
            c["init_args"]["dirpath"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("HFExport")
        ]
        assert exports == [str(tmp_path / stage / "export")]


def test_recipes_are_addressable_by_name_from_any_directory(tmp_path, monkeypatch):
    import subprocess
    import sys

    from rlhf_lit.apps.pipeline import from_args
    from rlhf_lit.apps.recipes import list_recipes, resolve_recipe
    from rlhf_lit.errors import InputError

    monkeypatch.chdir(tmp_path)
    assert {"pipeline/quickstart", "sft/tiny", "strategy/zero2", "pipeline/smollm2-hh"} <= set(list_recipes())
    assert resolve_recipe("recipe:pipeline/quickstart") == str(REPO / "configs/pipeline/quickstart.yaml")
    assert resolve_recipe("recipe:zero3") == str(REPO / "configs/strategy/zero3.yaml")  # a unique short name
    with pytest.raises(InputError, match="recipe:tiny is ambiguous"):
        resolve_recipe("recipe:tiny")
    pipe = from_args(["--config", "recipe:pipeline/quickstart", f"--run_dir={tmp_path}"])
    assert pipe.plans["ppo"].config == str(REPO / "configs/ppo/tiny.yaml")
    out = subprocess.run([sys.executable, "-m", "rlhf_lit", "recipes", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "recipe:pipeline/quickstart" in out.stdout
    missing = tmp_path / "p.yaml"
    missing.write_text(
        "stages: [{name: sft, config: nowhere.yaml}, {name: ppo, config: nowhere.yaml}]\n"
        "blend: {sources: [{name: synthetic}]}\nrun_dir: run\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "pipeline", "--config", str(missing)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("rlhf-lit pipeline: error: sft.config: nowhere.yaml does not exist")
    )


def test_the_package_ships_every_recipe_folder():
    """pyproject's data-files list every folder of configs/ with YAML in it (dpo/ was missing; #28)."""
    import tomllib

    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    folders = {p.parent.name for p in (REPO / "configs").glob("*/*.yaml")}
    assert {k.removeprefix("share/rlhf-lit/configs/") for k in shipped} == folders
    for key, globs in shipped.items():
        assert globs == [f"configs/{key.rsplit('/', 1)[1]}/*.yaml"]
