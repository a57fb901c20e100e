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
    # DeepSpeed's CPU ops as `make install` compiled them (never compiled inside a test; #26)
    "TORCH_EXTENSIONS_DIR": str(os.path.join(os.path.dirname(os.path.dirname(__file__)), ".venv", "torch_extensions")),
}.items():
    os.environ.setdefault(key, value)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

FAMILIES = [
    "opt",
    "gpt2",
    "bloom",
    "gpt_neox",
    "gptj",
    "gpt_neo",
    "codegen",
    "llama",
    "qwen2",
    "mistral",
    "gemma",
    "gemma2",
    "phi3",
]
"""every model family of rlhf_lit.hf.models.TinyModel: the forward/head/export unit tests cover each"""

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""a ChatML chat template (SmolLM2's and Qwen's layout) for tokenizers trained here"""


def synthetic_texts(n: int = 1500):
    from datamodules.synthetic import synthetic

    for r in synthetic(n=n, seed=0):
        yield from (r["prompt"], r["response"], r["chosen"], r["rejected"])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from rlhf_lit.hf.tokenizer import TrainedBPE

    path = tmp_path_factory.mktemp("tok") / "bpe"
    TrainedBPE(str(path), vocab_size=400).load(texts=synthetic_texts)
    return str(path)


@pytest.fixture()
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def tiny_spec():
    from rlhf_lit.hf.models import TinyModel

    return TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128)


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the short pipeline, built once and shared -------------------------------------------------------------


def short_recipe(tmp_path: Path, ppo_steps: int = 6, sft_epochs: int = 1, base: Path | None = None) -> Path:
    """A shortened copy of a pipeline recipe (default: the quickstart): 600 rows, 1-layer 32-wide models.
    Without a reward stage the recipe's PPO model settings (its reward source) are kept."""
    run_dir = tmp_path / "run"
    from rlhf_lit.apps.recipes import resolve_pipeline_paths

    base = base or REPO / "configs/pipeline/quickstart.yaml"
    cfg = resolve_pipeline_paths(yaml.safe_load(base.read_text()), base.resolve().parent)
    cfg["run_dir"] = str(run_dir)
    cfg["tokenizer"]["init_args"]["save_dir"] = str(run_dir / "tokenizer")
    cfg["blend"]["sources"][0]["options"]["n"] = 600
    cfg["checkpoint_every_n_steps"] = 3
    tiny = {"init_args": {"hidden_size": 32, "num_layers": 1, "ffn_size": 64}}
    stages = {s["name"]: s for s in cfg["stages"]}
    stages["sft"]["overrides"] = {
        "trainer": {"max_epochs": sft_epochs},
        "model": {"init_args": {"model": tiny, "rouge_samples": 2}},
    }
    ppo_model = stages["ppo"]["overrides"].get("model") if "reward" not in stages else None
    if "reward" in stages:
        stages["reward"]["overrides"] = {"trainer": {"max_epochs": 1}}
    stages["ppo"]["overrides"] = {"trainer": {"max_steps": ppo_steps}, "data": {"init_args": {"batch_size": 4}}}
    if ppo_model:  # a recipe without a reward model keeps its PPO stage's reward source
        stages["ppo"]["overrides"]["model"] = ppo_model
    cfg["evaluation"]["prompts"] = 8
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SECRET = "wandb-key-that-must-never-be-written-0123456789"


def rlhf_lit(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_API_KEY": SECRET}
    return subprocess.run(
        [sys.executable, "-m", "rlhf_lit", *args],
        capture_output=True,
        text=True,
        cwd=kw.pop("cwd", REPO),
        env=env,
        timeout=600,
        **kw,
    )


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A short plain pipeline, built once per test process (the DeepSpeed and resume tests share it): its
    exports feed the stages and its resolved stage configs are reused. A DPO stage config is written beside
    them: the reward stage's pairs and trainer, the DPO module on the SFT export."""
    tmp = tmp_path_factory.mktemp("ds")
    out = rlhf_lit("pipeline", "--config", str(short_recipe(tmp)))
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp / "run"
    cfg = yaml.safe_load((run / "reward" / "config.yaml").read_text())
    dpo = yaml.safe_load((REPO / "configs/dpo/tiny.yaml").read_text())["model"]
    dpo["init_args"]["model"]["init_args"]["path"] = str(run / "sft" / "export")
    (run / "dpo").mkdir()
    (run / "dpo" / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": dpo}))
    return run
