"""Every YAML in configs/ (and every experiment overlay on its base) parses with LightningCLI(run=False)."""
from pathlib import Path

import pytest
import yaml

from rlhf_lit.cli import lightning_cli

REPO = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if yaml.safe_load(p.read_text()).get("model"))


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_stage_config_parses_and_instantiates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = lightning_cli(["--config", str(path), "--trainer.logger=false"], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert type(cli.model).__name__ in {"SFTModule", "RewardModule", "PPOModule"}


def test_unknown_key_and_wrong_type_are_one_line_errors(tmp_path, capsys):
    base = yaml.safe_load((REPO / "configs/sft/tiny.yaml").read_text())
    base["model"]["init_args"]["rouge_sampels"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base))
    with pytest.raises(SystemExit):
        lightning_cli(["--config", str(bad)], run=False)
    assert "rouge_sampels" in capsys.readouterr().err
    base["model"]["init_args"].pop("rouge_sampels")
    base["model"]["init_args"]["rouge_samples"] = "many"
    bad.write_text(yaml.safe_dump(base))
    with pytest.raises(SystemExit):
        lightning_cli(["--config", str(bad)], run=False)
    assert "rouge_samples" in capsys.readouterr().err
