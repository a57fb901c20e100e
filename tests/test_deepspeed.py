"""DeepSpeed ZeRO 1/2/3 and offload through Lightning's DeepSpeedStrategy, on DeepSpeed's CPU accelerator
(gloo): every stage in one process, ZeRO-2/3 in two (torchrun), a ZeRO-3 resume, exports, equivalence."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

STAGES = ("sft", "reward", "ppo", "dpo")


def fit(run: Path, stage: str, out: Path, zero: str, steps: int = 2, procs: int = 1, extra=()):
    callbacks = json.dumps(
        [
            {"class_path": "rlhf_lit.training.callbacks.HFExport", "init_args": {"dirpath": str(out / "export")}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(out / "ckpt"),
                    "save_last": True,
                    "save_top_k": 0,
                    "every_n_train_steps": steps,
                },
            },
        ]
    )
    strategy = zero if zero.endswith(".yaml") else REPO / f"configs/strategy/{zero}.yaml"
    args = [
        "fit",
        "--config",
        str(run / stage / "config.yaml"),
        "--config",
        str(strategy),
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.callbacks={callbacks}",
        f"--trainer.devices={procs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]
    launcher = [sys.executable, "-m", "rlhf_lit"]
    if procs > 1:
        port = str(29500 + (os.getpid() + hash(str(out))) % 400)
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            f"--master_port={port}",
            "-m",
            "rlhf_lit",
        ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def first_export(run: Path, stage: str, out: Path) -> tuple[Path, Path]:
    """(the model the stage started from, the model it exported)."""
    new = out / "export" / ("actor" if stage == "ppo" else "")
    start = {
        "sft": None,
        "reward": run / "sft" / "export",
        "ppo": run / "sft" / "export",
        "dpo": run / "sft" / "export",
    }[stage]
    return start, new


def state(path: Path) -> dict:
    from safetensors.torch import load_file

    # a causal-LM export names its backbone "model.*"; a reward export saves the backbone alone
    return {k.removeprefix("model."): v for k, v in load_file(str(path / "model.safetensors")).items()}


def metrics(out: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(next(out.rglob("metrics.csv")))))


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_runs_under_zero_in_one_process(run, stage, zero, tmp_path):
    fit(run, stage, tmp_path, zero)
    start, new = first_export(run, stage, tmp_path)
    assert (new / "model.safetensors").exists()
    if start is not None:
        before, after = state(start), state(new)
        common = [k for k in after if k in before and before[k].shape == after[k].shape]
        assert common and any(not torch.equal(before[k], after[k]) for k in common)
    if stage == "ppo":
        assert (tmp_path / "export/critic/config.json").exists() and (tmp_path / "export/actor_ema").exists()
        assert "ForSequenceClassification" in (tmp_path / "export/critic/config.json").read_text()
    assert any(r.get("train/loss") or r.get("ppo/policy_loss") for r in metrics(tmp_path))


@pytest.mark.slow  # two processes (torchrun) per item
@pytest.mark.parametrize(
    "stage,zero", [(s, z) for s in STAGES for z in ("zero2", "zero3") if s != "dpo" or z == "zero3"]
)
def test_stage_runs_under_zero_on_two_processes(run, stage, zero, tmp_path):
    res = fit(run, stage, tmp_path, zero, procs=2)
    assert "MEMBER: 2/2" in res.stdout + res.stderr
    start, new = first_export(run, stage, tmp_path)
    AutoModelForCausalLM.from_pretrained(new) if stage != "reward" else None
    assert (new / "model.safetensors").exists()


@pytest.mark.slow  # optimizer offload: about a minute
def test_zero2_with_optimizer_offload(run, tmp_path):
    fit(run, "sft", tmp_path, "zero2_offload")
    assert (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.slow  # two ZeRO-3 fits and a consolidation
def test_zero3_checkpoint_resumes_and_export_equals_consolidated_weights(run, tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    fit(run, "sft", tmp_path, "zero3", steps=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_dir()  # DeepSpeed writes a directory of shards
    consolidated = tmp_path / "consolidated.pt"
    convert_zero_checkpoint_to_fp32_state_dict(str(last), str(consolidated))
    weights = {
        k.removeprefix("_forward_module.").removeprefix("model."): v
        for k, v in torch.load(consolidated, weights_only=True)["state_dict"].items()
    }
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # lm_head is tied to the embeddings
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, fresh(ids).logits)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ckpt", resumed / "ckpt")
    fit(run, "sft", resumed, "zero3", steps=4, extra=[f"--ckpt_path={resumed / 'ckpt' / 'last.ckpt'}"])
    steps = {int(r["step"]) for r in metrics(resumed) if r.get("train/loss")}
    assert steps and min(steps) >= 2 and max(steps) == 3  # continued at step 2, ran to 4


def test_zero2_step_equals_plain_training(run, tmp_path):
    plain = tmp_path / "plain"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lit",
            "fit",
            "--config",
            str(run / "sft" / "config.yaml"),
            # DDP on one process is plain training with the same distributed sampler as DeepSpeed
            "--trainer.strategy=ddp",
            "--trainer.devices=1",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={plain}",
            f"--trainer.logger.init_args.save_dir={plain}",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    fit(run, "sft", tmp_path / "z2", str(REPO / "tests/data/zero2_no_clip.yaml"), steps=3)
    a = [float(r["train/loss"]) for r in metrics(plain) if r.get("train/loss")]
    b = [float(r["train/loss"]) for r in metrics(tmp_path / "z2") if r.get("train/loss")]
    assert len(a) == len(b) == 3
    assert a[0] == pytest.approx(b[0], abs=1e-5)  # same data, same initial weights
    assert a[1:] == pytest.approx(b[1:], abs=1e-4)  # after one and two ZeRO-2 updates: the same weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_under_zero_on_gpu(run, zero, tmp_path):
    fit(run, "ppo", tmp_path, zero, extra=["--trainer.accelerator=gpu"])
    assert (tmp_path / "export/actor/model.safetensors").exists()


def test_validate_under_zero3_outside_fit(run):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lit",
            "validate",
            "--config",
            str(run / "sft" / "config.yaml"),
            "--config",
            str(REPO / "configs/strategy/zero3.yaml"),
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--model.init_args.rouge_samples=0",
            # the stage's export: a TinyModel config without --ckpt_path is refused (random weights, #28)
            "--model.init_args.model=rlhf_lit.hf.models.HFModel",
            f"--model.init_args.model.init_args.path={run / 'sft' / 'export'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val/loss" in res.stdout
