"""The pipeline end to end on a shortened embedded recipe; resume after a kill; chat and evaluate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, SECRET, rlhf_lit, short_recipe


def test_pipeline_summary_plot_skip_on_rerun_chat_and_evaluate(tmp_path):
    cfg = short_recipe(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = rlhf_lit("pipeline", "--config", str(cfg), cwd=elsewhere)  # not the checkout: paths resolve anyway
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) + len(out.stderr.splitlines()) < 150  # quiet: no per-load progress bars
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    for stage, key in [
        ("sft", "eval_loss"),
        ("reward", "heldout_accuracy"),
        ("sft", "gold_reward_mean"),
        ("sft", "gold_reward_std"),
        ("ppo", "gold_reward_mean"),
        ("ppo_ema", "gold_reward_mean"),
        ("sft", "rm_score_mean"),
        ("ppo", "rm_score_mean"),
        ("ppo", "kl"),
        ("sft", "wall_s"),
        ("reward", "wall_s"),
        ("ppo", "wall_s"),
        ("ppo", "win_rate_vs_sft_gold"),
    ]:
        assert isinstance(s[stage][key], float), (stage, key)
    assert s["sft"]["kl"] == 0.0 and (run / "reward_vs_kl.png").stat().st_size > 10_000
    written = [
        f for f in run.rglob("*") if f.is_file() and f.suffix in (".yaml", ".json", ".csv", ".md", ".jsonl", ".txt")
    ]
    assert written and not any(SECRET in f.read_text(errors="ignore") for f in written)  # no secrets on disk
    for sub in ("sft/export", "reward/export", "ppo/export/actor", "ppo/export/actor_ema", "ppo/export/critic"):
        assert (run / sub / "config.json").exists(), sub
    # each stage's resolved config is re-runnable on its own
    ppo_cfg = yaml.safe_load((run / "ppo/config.yaml").read_text())
    assert ppo_cfg["model"]["init_args"]["actor"]["init_args"]["path"] == str(run / "sft/export")

    again = rlhf_lit("pipeline", "--config", str(cfg))
    assert again.returncode == 0 and again.stdout.count("done already, skipping") == 3

    chat = rlhf_lit(
        "chat",
        "--model",
        str(run / "ppo/export/actor"),
        "--max-new-tokens",
        "8",
        input="List 3 fruits.\nclear\nReply in capitals: hello.\nquit\nnever read\n",
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    lines = chat.stdout.splitlines()
    assert lines[0] == "Human: List 3 fruits." and lines[1].startswith("Assistant:")
    assert "[history cleared]" in lines and "never read" not in chat.stdout

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"\n\nHuman: List {n} fruits.\n\nAssistant:"}) + "\n" for n in (2, 3))
    )
    ev = rlhf_lit(
        "evaluate",
        "--policy",
        str(run / "ppo/export/actor"),
        "--policy-b",
        str(run / "sft/export"),
        "--prompts",
        str(prompts),
        "--gold",
        "datamodules.synthetic:gold_reward",
        "--reward-model",
        str(run / "reward/export"),
        "--max-new-tokens",
        "8",
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(ev.stdout)
    assert 0 <= res["win_rate_a_over_b"] <= 1 and res["A"]["n"] == 2 and "gold_reward_mean" in res["B"]


def test_evaluate_and_chat_errors_are_one_line(tmp_path):
    ev = rlhf_lit(
        "evaluate",
        "--policy",
        str(tmp_path / "nope"),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--gold",
        "datamodules.synthetic:gold_reward",
    )
    assert ev.returncode == 1 and "error" in ev.stderr and "Traceback" not in ev.stderr
    chat = rlhf_lit("chat", "--model", str(tmp_path / "nope"), input="hi\n")
    assert chat.returncode == 1 and "nope" in chat.stderr and "Traceback" not in chat.stderr


@pytest.mark.slow  # a killed pipeline and its rerun
@pytest.mark.parametrize("stage", ["reward", "ppo"])
def test_kill_during_a_stage_then_rerun_completes(tmp_path, stage):
    cfg = short_recipe(tmp_path, ppo_steps=40, sft_epochs=1)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_lit", "pipeline", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = run / stage / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), f"no checkpoint of {stage} appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / stage / "DONE").exists()
    out = rlhf_lit("pipeline", "--config", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{stage}: resuming from" in out.stdout
    assert "ppo" in json.loads((run / "summary.json").read_text())
