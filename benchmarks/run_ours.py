"""rlhf-lit on the benchmark workload: the stage modules and datamodules users run, under a Lightning
Trainer (CPU, fp32, no logger or checkpoints, so the figures are the training loop's).

    python benchmarks/run_ours.py ppo --workload runs/bench/workload-tiny --steps 20 --warmup 3
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning as L
import torch
from common import HPARAMS, UNITS, StepLog, emit, parser

from datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from datamodules.blend import Blend, SourceSpec
from modules import PPOModule, RewardModule, SFTModule
from rlhf_lit.hf.models import HFModel, LoRA
from rlhf_lit.hf.models.attention import FP32_ATTENTION_ENV
from rlhf_lit.hf.models.forward import PADDING_FREE_ENV
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.math.estimators import GAE
from rlhf_lit.math.kl_control import FixedKL
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.generation import GenerationConfig
from rlhf_lit.rl.rewards import ModelReward
from rlhf_lit.training.optim import LRSchedule

H = HPARAMS
SPLITS = {"sft": [1, 0, 0], "reward": [0, 1, 0], "ppo": [0, 0, 1]}


class Timer(L.Callback):
    def __init__(self, log: StepLog, task: str) -> None:
        self.steplog, self.task = log, task

    def on_train_start(self, trainer, pl_module):
        self.steplog.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.task == "ppo":
            split = {k.removesuffix("_s"): v for k, v in pl_module.timing.items()}
            self.steplog.end(units=int(batch["prompt_ids"].size(0)), split=split)
        else:
            n = int(batch["input_ids"].size(0))
            if "position_ids" in batch:  # packed rows: count the examples in them
                n = int(((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum())
            self.steplog.end(units=n // 2 if self.task == "reward" else n, tokens=int(batch["attention_mask"].sum()))


def timed_trainer(log: StepLog, task: str, steps: int, **kw) -> L.Trainer:
    """A Trainer for ``steps`` steps timed by :class:`Timer`: no logger, checkpoints or validation, so the
    figures are the training loop's. ``kw``: accelerator, precision, strategy."""
    return L.Trainer(
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer(log, task)],
        **kw,
    )


def build(task: str, w: Path, options: dict, a=None):
    blend = Blend(
        [SourceSpec("hh_rlhf", path=str(w / "hh.jsonl"))], seed=H["seed"], split=SPLITS[task], eval_fraction=0.0
    )
    tok = HFTokenizer(str(w / "tokenizer"))
    batch_size = (a and a.batch_size) or H["batch_size"]
    common = dict(blend=blend, tokenizer=tok, batch_size=batch_size, max_seq_len=H["max_seq_len"], seed=H["seed"])
    opt = functools.partial(torch.optim.AdamW, lr=H["lr"])
    constant = LRSchedule(decay="constant")
    ckpt = bool(a and a.grad_ckpt)
    lora = LoRA(r=a.lora, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]) if a and a.lora else None
    if task == "sft":
        return SFTModule(
            HFModel(str(w / "policy"), gradient_checkpointing=ckpt), opt, constant, lora=lora
        ), SFTDataModule(**common, **options)
    if task == "reward":
        return RewardModule(
            HFModel(str(w / "reward"), gradient_checkpointing=ckpt), opt, constant
        ), PreferenceDataModule(**common, **{k: v for k, v in options.items() if k == "bucket_by_length"})
    critic, reward = (a and a.critic) or str(w / "reward"), (a and a.reward) or str(w / "reward")
    module = PPOModule(
        actor=HFModel(str(w / "policy"), gradient_checkpointing=ckpt),
        critic=HFModel(critic, gradient_checkpointing=ckpt),
        reward=ModelReward(reward, normalize=False),
        lora=lora,
        critic_lora=lora,
        frozen_dtype=a.frozen_dtype if a else "bfloat16",
        optimizer=opt,
        schedule=constant,
        kl=FixedKL(H["kl_coef"]),
        advantage=GAE(gamma=1.0, lam=0.95),
        generation=GenerationConfig(
            max_new_tokens=H["response_length"],
            temperature=H["temperature"],
            engine=(a and a.engine) or "kv_loop",
        ),
        # TRL's PPO keeps no EMA of the actor: off here so both do the same work.
        algo=PPOConfig(
            ppo_epochs=H["ppo_epochs"],
            num_minibatches=(a and a.minibatches) or H["num_minibatches"],
            critic_lr=H["lr"],
            ema_beta=None,
        ),
        samples_every=0,
    )
    return module, PromptDataModule(**common, max_prompt_len=H["max_prompt_len"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--bucket", action="store_true", help="SFT/reward: length-bucketed batches")
    p.add_argument("--pack", action="store_true", help="SFT: pack several examples per row")
    # the memory benchmark's knobs (benchmarks/memory.py, issue #18)
    p.add_argument("--frozen-dtype", default="bfloat16", help="PPO: storage dtype of the reference and reward")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the trained models")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on the attention of the actor (and critic) (0: off)")
    p.add_argument("--critic", default=None, help="PPO: critic folder (default: the workload's reward/)")
    p.add_argument("--reward", default=None, help="PPO: reward model folder (default: the workload's reward/)")
    # the speed work's generation-batch measurement (issue #19): a rollout of --batch-size prompts trained in
    # --minibatches minibatches
    p.add_argument("--batch-size", type=int, default=0, help="prompts (rows) per batch (0: the workload's 8)")
    p.add_argument("--minibatches", type=int, default=0, help="PPO: minibatches per rollout (0: the workload's 1)")
    p.add_argument("--engine", default="kv_loop", help="PPO: generation engine (kv_loop, compiled, hf, vllm)")
    p.add_argument(
        "--bf16-attention", action="store_true", help="attention in the autocast dtype, as transformers' sdpa (#30)"
    )
    p.add_argument("--padded", action="store_true", help="padded rows, not the padding-free forward (#30's A/B)")
    a = p.parse_args()
    if a.padded:  # the A/B of the padding-free forward (rlhf_lit.hf.models.forward.backbone_hidden)
        os.environ[PADDING_FREE_ENV] = "0"
    if a.bf16_attention:  # the A/B of the fp32 attention on CPU (rlhf_lit.hf.models.attention)
        os.environ[FP32_ATTENTION_ENV] = "0"
    L.seed_everything(H["seed"], verbose=False)
    options = {**({"bucket_by_length": True} if a.bucket else {}), **({"pack": True} if a.pack else {})}
    module, data = build(a.task, Path(a.workload), options, a)
    log = StepLog()
    precision = "bf16-mixed" if a.dtype == "bf16" else "32-true"
    # PPO's optimizer steps per batch: one per minibatch (Lightning's max_steps counts optimizer steps)
    per_batch = a.minibatches if a.task == "ppo" and a.minibatches else 1
    trainer = timed_trainer(log, a.task, (a.steps + a.warmup) * per_batch, accelerator="cpu", precision=precision)
    trainer.fit(module, datamodule=data)
    emit("ours", a.task, log, a.warmup, unit=UNITS[a.task], options=sorted(options))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
