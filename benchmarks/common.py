"""What every benchmark runner shares: the workload's hyperparameters and the result record.
Standard library only: runners import it from the peers' virtual environments too."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

# One set of hyperparameters for every framework (the workload).
HPARAMS = {
    "batch_size": 8,
    "lr": 1e-5,
    "max_seq_len": 128,  # prompts <= 64 tokens + answers <= 64 tokens
    "max_prompt_len": 64,
    "response_length": 64,  # PPO: new tokens per rollout
    "temperature": 1.0,
    "kl_coef": 0.05,
    "ppo_epochs": 1,
    "num_minibatches": 1,
    "seed": 0,
}
MARK = "BENCH_RESULT "


class StepLog:
    """Wall time between consecutive step ends (data loading and framework overhead included) and the
    work each step did (real tokens, pairs or prompts)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.steps: list[dict] = []

    def start(self) -> None:
        self.last = time.perf_counter()

    def end(self, **work) -> None:
        now = time.perf_counter()
        self.steps.append({"s": now - self.last, **work})
        self.last = now


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(framework: str, task: str, log: StepLog, warmup: int, **extra) -> None:
    """Print the run's record as one marked JSON line for the orchestrator."""
    if len(log.steps) <= warmup:
        raise SystemExit(f"{framework} {task}: only {len(log.steps)} steps ran, need more than warmup={warmup}")
    record = {
        "framework": framework,
        "task": task,
        "warmup": warmup,
        "steps": log.steps[warmup:],
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }
    sys.stdout.write(MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


UNITS = {"sft": "tokens", "reward": "pairs", "ppo": "prompts"}


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every runner takes: task, workload folder, measured steps, warm-up steps."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("task", choices=tuple(UNITS))
    p.add_argument("--workload", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: mixed precision (autocast)")
    return p
