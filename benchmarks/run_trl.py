"""TRL on the benchmark workload: SFTTrainer / RewardTrainer (current release, .bench/trl) and PPO
(trl==1.12.0's trl.experimental.ppo, .bench/trl-ppo). Runs in those environments; imports no rlhf_lit.

    .bench/trl/bin/python benchmarks/run_trl.py sft --workload runs/bench/workload-tiny --steps 40 --warmup 5

Settings follow benchmarks/common.HPARAMS; TRL's CPU-unfriendly defaults (bf16, gradient
checkpointing) are turned off so every framework does the same fp32 work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from common import HPARAMS, StepLog, emit, parser, read_jsonl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

H = HPARAMS


class Timer(TrainerCallback):
    def __init__(self, log: StepLog, work: list[dict]) -> None:
        self.log, self.work, self.i = log, work, 0

    def on_train_begin(self, args, state, control, **kw):
        self.log.start()

    def on_step_end(self, args, state, control, **kw):
        # The collator records each batch's work in order; step i trained on the i-th batch
        # (accelerate looks one batch ahead, so the list may run one ahead of the steps).
        self.log.end(**(self.work[self.i] if self.i < len(self.work) else {}))
        self.i += 1


def counting(collator, work: list[dict], pairs: bool):
    def collate(features):
        batch = collator(features)
        if "attention_mask" not in batch:  # real tokens cannot be told from padding: refuse to guess
            raise SystemExit(f"TRL's collator gave no attention_mask (keys {sorted(batch)}): cannot count real tokens")
        n = int(batch["input_ids"].size(0))
        work.append({"tokens": int(batch["attention_mask"].sum()), "units": n // 2 if pairs else n})
        return batch

    return collate


BF16 = False  # --dtype bf16: the Trainer's bf16 (autocast on CPU)
GRAD_CKPT = False  # --grad-ckpt: TRL's gradient checkpointing (the memory benchmark, issue #18)


def common_args(out: str, steps: int) -> dict:
    return dict(
        output_dir=out,
        per_device_train_batch_size=H["batch_size"],
        learning_rate=H["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=steps,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=BF16,
        gradient_checkpointing=GRAD_CKPT,
        dataloader_num_workers=0,
        seed=H["seed"],
        disable_tqdm=True,
    )


def conversations(w: Path, tok) -> list[dict] | None:
    """The workload's rows as chat messages where the tokenizer has a chat template (SmolLM2): TRL then
    renders them with it, as rlhf-lit does, and both train on the same tokens. Plain HH text (TRL's
    standard format) would skip the template: 25-38% fewer tokens a row than rlhf-lit trains on."""
    if not tok.chat_template:
        return None
    return read_jsonl(w / "conversations.jsonl")


def run_sft(w: Path, steps: int, warmup: int, out: str) -> None:
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(w / "tokenizer")
    rows = conversations(w, tok) or read_jsonl(w / "records.jsonl")
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    args = SFTConfig(
        **common_args(out, steps),
        max_length=H["max_seq_len"],
        packing=False,
        completion_only_loss=True,
        dataset_num_proc=1,
    )
    log, work = StepLog(), []
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(w / "policy"),
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Timer(log, work)],
    )
    trainer.data_collator = counting(trainer.data_collator, work, pairs=False)
    trainer.train()
    emit("trl", "sft", log, warmup, unit="tokens")


def run_reward(w: Path, steps: int, warmup: int, out: str) -> None:
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(w / "tokenizer")
    data = Dataset.from_list(conversations(w, tok) or read_jsonl(w / "records.jsonl"))
    args = RewardConfig(**common_args(out, steps), max_length=H["max_seq_len"], dataset_num_proc=1)
    model = AutoModelForSequenceClassification.from_pretrained(w / "reward_hf", num_labels=1)
    log, work = StepLog(), []
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Timer(log, work)]
    )
    trainer.data_collator = counting(trainer.data_collator, work, pairs=True)
    trainer.train()
    emit("trl", "reward", log, warmup, unit="pairs")


def run_ppo(w: Path, steps: int, warmup: int, out: str) -> None:
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(w / "tokenizer", padding_side="left")
    chats = conversations(w, tok)
    if chats:
        texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chats]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tok([r["prompt"] for r in read_jsonl(w / "records.jsonl")], add_special_tokens=False)["input_ids"]
    data = Dataset.from_dict({"input_ids": [x[-H["max_prompt_len"] :] for x in ids]})
    n = steps * H["batch_size"]
    args = PPOConfig(
        **{**common_args(out, steps), "max_steps": -1},
        total_episodes=n,
        num_ppo_epochs=H["ppo_epochs"],
        num_mini_batches=H["num_minibatches"],
        local_rollout_forward_batch_size=H["batch_size"],
        response_length=H["response_length"],
        stop_token="eos",
        temperature=H["temperature"],
        kl_coef=H["kl_coef"],
        num_sample_generations=0,
        missing_eos_penalty=None,
    )
    load = lambda cls, d: cls.from_pretrained(
        w / d, **({"num_labels": 1} if cls is AutoModelForSequenceClassification else {})
    )
    log = StepLog()
    work = [{"units": H["batch_size"]}] * steps
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=load(AutoModelForCausalLM, "policy"),
        ref_model=load(AutoModelForCausalLM, "policy"),
        reward_model=load(AutoModelForSequenceClassification, "reward_hf"),
        value_model=load(AutoModelForSequenceClassification, "reward_hf"),
        train_dataset=data,
        callbacks=[Timer(log, work)],
    )
    trainer.train()
    emit("trl", "ppo", log, warmup, unit="prompts")


def main() -> None:
    global GRAD_CKPT, BF16
    p = parser(__doc__)
    p.add_argument("--grad-ckpt", action="store_true", help="TRL's gradient checkpointing on")
    a = p.parse_args()
    GRAD_CKPT, BF16 = a.grad_ckpt, a.dtype == "bf16"
    torch.manual_seed(H["seed"])
    with tempfile.TemporaryDirectory() as out:
        {"sft": run_sft, "reward": run_reward, "ppo": run_ppo}[a.task](
            Path(a.workload), a.steps + a.warmup, a.warmup, out
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
