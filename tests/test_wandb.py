"""What lands in a W&B run (issue #16): a tiny SFT stage through the CLI with ``WANDB_MODE=offline``, its
offline run file read back record by record: metrics, the resolved config, the samples table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file: a 7-byte header (":W&B", magic, version),
    then LevelDB's log format (32 KiB blocks; each chunk has a CRC, a length and a FULL/FIRST/MIDDLE/LAST
    type). wandb >= 0.19 writes it from its Go core and ships no Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7 or data[pos + 6] == 0:  # block trailer or zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_offline_run_holds_metrics_config_and_the_samples_table(tmp_path):
    over = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 6,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "rlhf-lit-test", "save_dir": str(tmp_path), "name": "tiny-sft"},
            },
            "callbacks": [{"class_path": "rlhf_lit.training.callbacks.SampleTable"}],
        },
        "model": {"init_args": {"rouge_samples": 3}},
        "data": {"init_args": {"tokenizer": {"init_args": {"save_dir": str(tmp_path / "tok")}}}},
    }
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(over))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "fit", "--config", "recipe:sft/tiny", "--config", "o.yaml"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    [run_file] = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("run") == 1 and "exit" in kinds

    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.history.item
    ]
    keys = set().union(*history)
    assert {"train/loss", "train/device/items_per_sec", "val/loss", "val/ppl", "val/rouge1"} <= keys
    assert all(float(h["train/loss"]) > 0 for h in history if "train/loss" in h)

    config = {i.key: json.loads(i.value_json) for r in records if r.config.update for i in r.config.update}
    model = config["model"]  # the resolved config of the stage, as the CLI composed it
    assert model["class_path"] == "rlhf_lit.hf.models.TinyModel" and model["init_args"]["family"] == "opt"
    assert config["rouge_samples"] == 3

    # The table arrives as nested keys (val/samples/_type, .../nrows, ...) pointing at its media file.
    table = {k.split("/", 2)[2]: json.loads(v) for h in history for k, v in h.items() if k.startswith("val/samples/")}
    assert table["_type"] == "table-file" and table["ncols"] == 3 and table["nrows"] == 3
    [media] = list(run_file.parent.rglob("*.table.json"))
    content = json.loads(media.read_text())
    assert content["columns"] == ["prompt", "generation", "reference"] and len(content["data"]) == 3
