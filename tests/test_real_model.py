"""A real pretrained chat model through the three stages (issue #13): SmolLM2-135M-Instruct, installed by
``make smollm2`` (``make test`` does it first), run through the shipped ``configs/*/smollm2.yaml``
recipes for a few steps each on conversational rows, with its ChatML template. Exports reload with
plain ``from_pretrained``; ``rlhf-lit chat`` on the SFT export answers through the template and stops at
``<|im_end|>``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

MODEL = REPO / "models" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").exists(), reason="the real model is not installed: run `make smollm2`"
)

QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "I like turtles."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders are blue."),
    ("What colour is the sky on a clear day?", "It is blue.", "The sky is made of cheese."),
    ("What is 2 plus 2?", "2 plus 2 is 4.", "It is 5."),
    ("Name a fruit that is yellow.", "A banana is yellow.", "A brick."),
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
]


def rows(path: Path) -> Path:
    """TRL's conversational layout: prompt, chosen and rejected as message lists."""
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
            + "\n"
            for q, c, r in QA
        )
    )
    return path


def fit(stage: str, tmp: Path, data: Path, model: dict, extra_data: dict | None = None) -> subprocess.CompletedProcess:
    over = {
        "trainer": {
            "max_steps": 2,
            "limit_val_batches": 0,
            "default_root_dir": str(tmp / stage),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / stage), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "rlhf_lit.training.callbacks.HFExport",
                    "init_args": {"dirpath": str(tmp / stage / "export")},
                }
            ],
            "enable_progress_bar": False,
        },
        "model": {"init_args": model},
        "data": {
            "init_args": {
                "batch_size": 2,
                "blend": {
                    "sources": [
                        {
                            "name": "json",
                            "path": str(data),
                            "options": {"fields": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}},
                        }
                    ],
                    "seed": 0,
                    "split": [1, 1, 1],
                    "eval_fraction": 0.0,
                },
                **(extra_data or {}),
            }
        },
    }
    (tmp / f"{stage}.yaml").write_text(yaml.safe_dump(over))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lit",
            "fit",
            "--config",
            str(REPO / f"configs/{stage}/smollm2.yaml"),
            "--config",
            str(tmp / f"{stage}.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.slow  # the real model through three stages
def test_smollm2_through_sft_reward_ppo_and_chat(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = rows(tmp_path / "qa.jsonl")
    sft = fit(
        "sft",
        tmp_path,
        data,
        {
            "model": {
                "class_path": "rlhf_lit.hf.models.HFModel",
                "init_args": {"path": str(MODEL), "gradient_checkpointing": True},
            }
        },
    )
    assert "eval mode" not in sft.stderr  # from_pretrained's eval mode is switched to train (#13)
    assert "Modules in train mode" not in sft.stderr or "eval mode: 0" in sft.stderr
    sft_dir = tmp_path / "sft" / "export"
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert policy.config.vocab_size == 49152  # pad reused (eos), the pretrained vocabulary kept

    fit(
        "reward",
        tmp_path,
        data,
        {"model": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": str(sft_dir)}}},
        {"tokenizer": {"class_path": "rlhf_lit.hf.tokenizer.HFTokenizer", "init_args": {"path": str(sft_dir)}}},
    )
    rm_dir = tmp_path / "reward" / "export"
    assert json.loads((rm_dir / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    # pad == eos in SmolLM2: the reward export pads with unk, so transformers' classifiers read the last token
    assert AutoTokenizer.from_pretrained(rm_dir).pad_token == "<|endoftext|>"

    model = {
        "actor": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": str(sft_dir)}},
        "critic": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": str(rm_dir)}},
        "reward": {
            "class_path": "rlhf_lit.rl.rewards.ModelReward",
            "init_args": {"path": str(rm_dir), "normalize": False},
        },
        "generation": {"max_new_tokens": 8, "temperature": 0.8},
        "algo": {"ema_beta": None},
    }
    fit(
        "ppo",
        tmp_path,
        data,
        model,
        {
            "tokenizer": {"class_path": "rlhf_lit.hf.tokenizer.HFTokenizer", "init_args": {"path": str(sft_dir)}},
            "max_prompt_len": 96,
        },
    )
    logs = next((tmp_path / "ppo").rglob("metrics.csv")).read_text()
    assert "objective/kl" in logs and "ppo/actor_grad_norm" in logs and "ppo/critic_grad_norm" in logs
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "export" / "actor")
    assert actor.config.vocab_size == 49152

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lit",
            "chat",
            "--model",
            str(sft_dir),
            "--greedy",
            "--max-new-tokens",
            "24",
        ],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    answer = [line for line in res.stdout.splitlines() if line.startswith("Assistant:")]
    assert len(answer) == 1 and "Paris" in answer[0] and "<|im_end|>" not in answer[0]
    # Stopped at the end-of-turn token: a short answer, not 24 tokens of continuation.
    assert len(answer[0].split()) < 15


@pytest.mark.slow  # the real model as actor, critic and reward
def test_raw_smollm2_as_actor_critic_and_reward(tmp_path):
    """Issue #17's crash: a raw checkpoint whose tokenizer pads with eos as actor, critic and reward model.
    Nothing is resized any more; the reward model's head is new, so its statistics come from rollouts."""
    data = rows(tmp_path / "qa.jsonl")
    raw = {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": str(MODEL)}}
    reward = {"class_path": "rlhf_lit.rl.rewards.ModelReward", "init_args": {"path": str(MODEL), "stats_rollouts": 1}}
    model = {"actor": raw, "critic": raw, "reward": reward}
    model.update(generation={"max_new_tokens": 4}, algo={"ema_beta": None})
    tokenizer = {"class_path": "rlhf_lit.hf.tokenizer.HFTokenizer", "init_args": {"path": str(MODEL)}}
    res = fit("ppo", tmp_path, data, model, {"tokenizer": tokenizer, "max_prompt_len": 64})
    assert "IndexError" not in res.stderr
    assert "objective/scores" in next((tmp_path / "ppo").rglob("metrics.csv")).read_text()
