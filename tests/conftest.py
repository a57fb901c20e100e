"""Shared fixtures: offline environment, a tokenizer trained on the embedded task, tiny model specs."""

from __future__ import annotations

import os

# Before torch/transformers import: one thread (2-core machine), no hub, W&B offline.
for key, value in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(key, value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def synthetic_texts(n: int = 1500):
    from datamodules.synthetic import synthetic

    for r in synthetic(n=n, seed=0):
        yield from (r["prompt"], r["response"], r["chosen"], r["rejected"])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from rlhf_lit.tokenizer import TrainedBPE

    path = tmp_path_factory.mktemp("tok") / "bpe"
    TrainedBPE(str(path), vocab_size=400).load(texts=synthetic_texts)
    return str(path)


@pytest.fixture()
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def tiny_spec():
    from rlhf_lit.models import TinyModel

    return TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128)


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
