"""DeepSpeed-Chat's headline shape on a GPU: an OPT-1.3B actor with an OPT-350M critic and reward model
(built from config, random weights), bf16 mixed precision, ZeRO-2, a few PPO steps of the benchmark's
workload (batch 8, prompts <= 64 tokens, 64 new tokens). Prints one JSON line: tokens/s, prompts/s, the
generate/score/train split and the peak memory (CUDA allocated, or RSS on CPU).

    make bench-gpu                          # on a machine with a CUDA GPU (needs `make smollm2`: the tokenizer)
    python benchmarks/gpu_ppo.py --dry-run  # the same code path on CPU with the tiny shape (tested)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actor", default="opt-1.3b")
    p.add_argument("--critic", default="opt-350m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage")
    p.add_argument(
        "--engine",
        default="kv_loop",
        help="generation engine: kv_loop, compiled (static cache + compiled decode; on a GPU the per-token "
        "launch overhead it removes is most of a small batch's decode time, untested on one here), or vllm "
        "(the colocated vLLM engine, `make vllm VLLM=vllm` on a GPU machine)",
    )
    p.add_argument(
        "--vllm-sleep", action="store_true", help="engine vllm: sleep mode between rollouts (frees its KV cache)"
    )
    p.add_argument("--out", default="runs/bench")
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, the tiny shape, 2 + 1 steps of 4 prompts x 8 new tokens"
    )
    a = p.parse_args()
    if a.dry_run:
        a.actor = a.critic = "tiny"
        a.steps, a.warmup = 2, 1
    import torch
    from common import HPARAMS, StepLog
    from run_ours import build as build_stage
    from run_ours import timed_trainer
    from workload import build

    from rlhf_lit.training.strategies import DeepSpeedStrategy

    if a.dry_run:  # a check of the code path, not a measurement: bf16 is emulated on CPUs without bf16 units
        HPARAMS.update(batch_size=4, response_length=8)

    gpu = torch.cuda.is_available() and not a.dry_run
    if not gpu and not a.dry_run:
        raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run to check the script on CPU")
    actor_w, critic_w = (ROOT / a.out / f"workload-{s}" for s in (a.actor, a.critic))
    meta = build(a.actor, actor_w)
    build(a.critic, critic_w)
    knobs = SimpleNamespace(
        grad_ckpt=False,
        lora=0,
        critic=str(critic_w / "reward"),
        reward=str(critic_w / "reward"),
        frozen_dtype="bfloat16",
        batch_size=0,
        minibatches=0,
        engine=a.engine,
    )
    module, data = build_stage("ppo", actor_w, {}, knobs)
    module.gen.vllm.sleep = a.vllm_sleep
    log = StepLog()
    trainer = timed_trainer(
        log,
        "ppo",
        a.steps + a.warmup,
        accelerator="gpu" if gpu else "cpu",
        strategy=DeepSpeedStrategy(stage=a.zero),
        precision="bf16-mixed",
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    steps = log.steps[a.warmup :]
    wall = sum(s["s"] for s in steps)
    tokens = len(steps) * HPARAMS["batch_size"] * (meta["mean_prompt_tokens"] + HPARAMS["response_length"])
    split = {k: sum(s["split"].get(k, 0.0) for s in steps) for k in ("generate", "score", "train")}
    from common import peak_rss_mib

    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
        "actor": a.actor,
        "critic": a.critic,
        "zero_stage": a.zero,
        "engine": a.engine,
        "precision": "bf16-mixed",
        "measured_steps": len(steps),
        "prompts_per_s": round(len(steps) * HPARAMS["batch_size"] / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "split": {k: round(v / max(sum(split.values()), 1e-9), 3) for k, v in split.items()},
        "peak_cuda_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "peak_rss_gib": round(peak_rss_mib() / 1024, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
