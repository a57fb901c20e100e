"""Crash and resume: a run killed (SIGKILL) at a random step and re-run from its last checkpoint ends
with the same weights as an uninterrupted run, for SFT, reward, PPO and DPO (data position, optimizer,
scheduler, RNG, EMA and KL controller all restored; DPO's cached reference log-probs are recomputed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

STEPS = 12


def command(run_dir: Path, stage: str, out: Path, extra=()):
    callbacks = json.dumps(
        [
            {"class_path": "rlhf_lit.training.callbacks.HFExport", "init_args": {"dirpath": str(out / "export")}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(out / "ckpt"),
                    "save_last": True,
                    "save_top_k": 0,
                    "every_n_train_steps": 1,
                },
            },
        ]
    )
    return [
        sys.executable,
        "-m",
        "rlhf_lit",
        "fit",
        "--config",
        str(run_dir / stage / "config.yaml"),
        f"--trainer.max_steps={STEPS}",
        "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.callbacks={callbacks}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def weights(export: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(export.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def last_step(ckpt: Path) -> int:
    try:
        return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]
    except Exception:  # not written yet
        return -1


@pytest.mark.slow  # SIGKILL resume: two runs per stage
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo"])
def test_sigkill_then_resume_equals_uninterrupted(run, stage, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(
        command(run, stage, tmp_path / "whole"), capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    kill_at = random.Random(stage).randint(3, STEPS - 3)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(run, stage, out),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while last_step(out / "ckpt" / "last.ckpt") < kill_at and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < last_step(out / "ckpt" / "last.ckpt") < STEPS, "the kill did not land mid-run"
    assert not (out / "export").exists()

    resumed = subprocess.run(
        command(run, stage, out, [f"--ckpt_path={out / 'ckpt' / 'last.ckpt'}"]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "whole" / "export"), weights(out / "export")
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst} (killed after step {kill_at})"


def test_atomic_checkpoint_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from rlhf_lit.training.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def boom(*a, **k):
        raise KeyboardInterrupt  # a crash in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1


def test_plain_fit_killed_mid_epoch_resumes_with_its_own_config(tmp_path):
    """#28: the stage config as shipped (its ModelCheckpoint saves last.ckpt every 20 steps), one key for
    every output (``--trainer.default_root_dir``), SIGKILL mid-epoch, ``--ckpt_path last``: the export equals
    an uninterrupted run's."""
    steps = 60  # 50 steps an epoch: the kill lands in the first epoch, after step 20's checkpoint
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fit = lambda root, *a: [sys.executable, "-m", "rlhf_lit", "fit", "--config", "recipe:sft/tiny",
                            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
                            "--trainer.enable_progress_bar=false", *a]  # fmt: skip
    whole = subprocess.run(fit("whole"), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (tmp_path / "whole/logs").is_dir() and (tmp_path / "whole/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "runs/tiny/sft").exists()  # nothing left at the config's own paths

    proc = subprocess.Popen(fit("killed"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    last, deadline = tmp_path / "killed/checkpoints/last.ckpt", time.time() + 300
    while last_step(last) < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 20 <= last_step(last) < steps and not (tmp_path / "killed/export").exists(), "the kill missed"

    resumed = subprocess.run(fit("killed", "--ckpt_path", "last"), capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=600)  # fmt: skip
    assert resumed.returncode == 0 and "Restoring states" in resumed.stderr, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "whole/export"), weights(tmp_path / "killed/export")
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
