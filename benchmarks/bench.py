"""The benchmark suite: rlhf-lit vs a bare PyTorch loop vs TRL on one fixed workload, side by side.

    make bench                                   # set-up of the peers' environments + this, with defaults
    python benchmarks/bench.py [--sizes tiny,smollm2] [--dtypes fp32,bf16] [--tasks sft,reward,ppo]
                               [--repeats 3] [--json]

Sizes: tiny and 30m (OPT, the workload's own tokenizer) and smollm2 (SmolLM2-135M-Instruct, real weights
after `make smollm2`). dtypes: fp32, or bf16 as mixed precision for every contender (Lightning's
bf16-mixed, autocast in the bare loop, TRL's bf16=True); ``auto`` (default) adds bf16 only where the CPU
has bf16 units. Ratio keys: ``<task>_vs_<peer>`` for tiny fp32 (as before), ``<size>_<dtype>_<task>_vs_<peer>``
for the rest. For every size, dtype, task and repeat, each contender runs in its own process (ours and the bare loop in
.venv, TRL's SFTTrainer/RewardTrainer in .bench/trl, TRL 1.12's PPO in .bench/trl-ppo), in an order
that rotates between repeats. A run's throughput is its work (real tokens, pairs, prompts) over the wall
time of its steps after warm-up; the table shows the median over repeats. Ratios are computed per
repeat, pair by pair (this shared machine is noisy), then the median is taken.
MFU = model FLOP/s (the same formula for every contender, see ``model_flops``) / this machine's matmul
FLOP/s in the same dtype, measured in the same run on one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import HPARAMS, MARK  # noqa: E402

PEERS = {"trl": ROOT / ".bench/trl/bin/python", "trl-ppo": ROOT / ".bench/trl-ppo/bin/python"}
# (steps, warmup) per size and task: enough steps for a stable median in about a minute per run.
STEPS = {
    "tiny": {"sft": (40, 5), "reward": (40, 5), "ppo": (20, 3)},
    "30m": {"sft": (12, 2), "reward": (12, 2), "ppo": (5, 1)},
    "smollm2": {"sft": (4, 1), "reward": (4, 1), "ppo": (4, 1)},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def key_prefix(size: str, dtype: str) -> str:
    """Ratio keys: the original tiny fp32 ones unprefixed (``ppo_vs_trl``), the others ``<size>_<dtype>_``."""
    return "" if (size, dtype) == ("tiny", "fp32") else f"{size}_{dtype}_"


def resolve_dtypes(spec: str) -> list[str]:
    """``auto``: fp32, plus bf16 where this machine multiplies bf16 natively (without bf16 units a bf16 linear
    layer runs ~7x slower than fp32 here: such rows time the emulation more than the frameworks)."""
    if spec != "auto":
        return spec.split(",")
    import torch

    from rlhf_lit.hf.models import native_half

    if native_half(torch.device("cpu"), torch.bfloat16):
        return ["fp32", "bf16"]
    print(
        "note: bf16 left out (--dtypes auto): this CPU has no bf16 units; --dtypes fp32,bf16 forces it", file=sys.stderr
    )
    return ["fp32"]


ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TRANSFORMERS_VERBOSITY": "error",
}


def contenders(task: str, size: str = "tiny") -> list[tuple[str, list[str]]]:
    """(name, command) of every contender of a task; the first is ours with defaults."""
    py = sys.executable
    out = [("ours", [py, str(HERE / "run_ours.py"), task])]
    if size != "tiny":
        # the A/B of the fp32 attention under bf16 on CPU (#30); bf16 rows only (in fp32 both are the same)
        out.append(("ours_bf16_attention", [py, str(HERE / "run_ours.py"), task, "--bf16-attention"]))
        # the A/B of the padding-free forward (#30): the same work on padded rows
        out.append(("ours_padded", [py, str(HERE / "run_ours.py"), task, "--padded"]))
    if task == "ppo" and size == "tiny":
        # the compiled decode step pays at the tiny size only: at SmolLM2's its generation ran 8% slower on
        # this CPU after a 95 s compile (benchmarks/README.md)
        out.append(("ours_compiled", [py, str(HERE / "run_ours.py"), task, "--engine", "compiled"]))
    if task == "ppo" and importlib.util.find_spec("vllm") is not None:
        # rollouts through the colocated vLLM engine (issue #25; `make vllm`), weight sync in the step's time
        out.append(("ours_vllm", [py, str(HERE / "run_ours.py"), task, "--engine", "vllm"]))
    if task in ("sft", "reward"):
        out.append(("ours_bucketed", [py, str(HERE / "run_ours.py"), task, "--bucket"]))
    if task == "sft":
        out.append(("ours_packed", [py, str(HERE / "run_ours.py"), task, "--pack"]))
    out.append(("bare", [py, str(HERE / "run_bare.py"), task]))
    peer = PEERS["trl-ppo" if task == "ppo" else "trl"]
    if peer.exists():
        out.append(("trl", [str(peer), str(HERE / "run_trl.py"), task]))
    return out


def run(cmd: list[str], workload: Path, steps: int, warmup: int) -> dict:
    cmd = cmd + ["--workload", str(workload), "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"benchmark run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(lines[-1][len(MARK) :])


def matmul_flops(dtype: str = "fp32", n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of one thread (the contenders run with OMP_NUM_THREADS=1) for a ``dtype`` n x n linear layer,
    ``F.linear`` as the models call it: best of ``reps``. (On CPUs without bf16 units, bf16 ``F.linear``
    takes oneDNN's path, ~9 GFLOP/s here, while a bf16 ``a @ b`` crawls at ~0.9: the models' path is the peak.)"""
    import torch

    torch.set_num_threads(1)
    x, w = (torch.randn(n, n, dtype=getattr(torch, DTYPES[dtype])) for _ in range(2))
    for _ in range(2):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps if dtype == "fp32" else 5):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops(task: str, meta: dict, summary: dict) -> float:
    """Model FLOPs of the work done per second: 2 per parameter per token forward, 6 forward+backward
    (Kaplan et al. 2020), attention's quadratic term left out (small at <= 128 tokens). The LM head counts
    as parameters where it runs: V x d."""
    body, head = meta["non_embedding_params"], meta["vocab"] * meta["hidden_size"]
    if task == "sft":
        return 6 * (body + head) * summary["tokens_per_s"]
    if task == "reward":
        return 6 * body * summary["tokens_per_s"]
    # PPO per prompt, with prompt + response tokens L: generate (2, actor), reference (2), reward (2,
    # no head), actor train (6) and critic train (6, no head); responses of max length.
    length = meta["mean_prompt_tokens"] + HPARAMS["response_length"]
    per_prompt = length * ((2 + 2 + 6) * (body + head) + (2 + 6) * body)
    return per_prompt * summary["units_per_s"]


def figure(task: str, summary: dict) -> float:
    """The compared figure: real (unpadded) tokens/s for SFT, pairs/s for reward, prompts/s for PPO."""
    return summary["tokens_per_s"] if task == "sft" else summary["units_per_s"]


def summarize(rec: dict) -> dict:
    steps = rec["steps"]
    wall = sum(s["s"] for s in steps)
    out = {"units_per_s": sum(s["units"] for s in steps) / wall, "peak_rss_mib": rec["peak_rss_mib"]}
    if all("tokens" in s for s in steps):
        out["tokens_per_s"] = sum(s["tokens"] for s in steps) / wall
    split = [s["split"] for s in steps if s.get("split")]
    if split:
        total = {k: sum(x.get(k, 0.0) for x in split) for k in ("generate", "score", "train", "sync")}
        out["split"] = {k: v / max(sum(total.values()), 1e-12) for k, v in total.items()}
    return out


def median_of(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in ("units_per_s", "tokens_per_s") if k in runs[0]}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    if "split" in runs[0]:
        out["split"] = {k: statistics.median(r["split"][k] for r in runs) for k in runs[0]["split"]}
    out["runs"] = [float(f"{r['units_per_s']:.3g}") for r in runs]  # 3 significant digits: SmolLM2 PPO is ~0.1/s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,smollm2")
    p.add_argument("--dtypes", default="auto", help="fp32, bf16 (mixed precision) or auto: bf16 where native")
    p.add_argument("--tasks", default="sft,reward,ppo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contenders", default="", help="only these contenders, comma-separated (default: all)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="3 steps after 1 warm-up step everywhere (a smoke test)")
    p.add_argument("--report", default="", help="print the table of a saved report.json instead of running")
    a = p.parse_args()
    if a.report:
        print(table(json.loads(Path(a.report).read_text())))
        return
    # every contender any task and size has (TRL's only where its environment exists, so named here too)
    known = {n for task in UNITS for size in STEPS for n, _ in contenders(task, size)} | {"trl"}
    keep = set(a.contenders.split(",")) if a.contenders else None
    unknown = sorted((keep or set()) - known)
    if unknown:
        raise SystemExit(f"bench.py: --contenders: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    from workload import build

    sizes, tasks, dtypes = a.sizes.split(","), a.tasks.split(","), resolve_dtypes(a.dtypes)
    missing = [k for k, v in PEERS.items() if not v.exists()]
    if missing:
        print(
            f"note: no {', '.join(missing)} environment: TRL columns left out (run benchmarks/setup_peers.sh)",
            file=sys.stderr,
        )
    peak = {d: [matmul_flops(d)] for d in dtypes}
    raw: dict = {}
    ratios_per_repeat: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    (ROOT / a.out).mkdir(parents=True, exist_ok=True)
    raw_log = open(ROOT / a.out / "raw.jsonl", "w")  # every run's summary as it comes, kept if a later step fails
    for size in sizes:
        workload = ROOT / a.out / f"workload-{size}"
        meta = build(size, workload)
        for dtype in dtypes:
            for task in tasks:
                steps, warmup = (3, 1) if a.quick else STEPS[size][task]
                names = [
                    (n, cmd + ["--dtype", dtype])
                    for n, cmd in contenders(task, size)
                    if (keep is None or n in keep) and not (n == "ours_bf16_attention" and dtype == "fp32")
                ]
                for r in range(a.repeats):
                    order = names[r % len(names) :] + names[: r % len(names)]  # rotate who runs first
                    got = {}
                    for name, cmd in order:
                        got[name] = summarize(run(cmd, workload, steps, warmup))
                        row = {"size": size, "dtype": dtype, "task": task, "contender": name, "repeat": r}
                        raw_log.write(json.dumps({**row, **got[name]}) + "\n")
                        raw_log.flush()
                        raw.setdefault((size, dtype, task, name), []).append(got[name])
                        print(
                            f"[{time.perf_counter() - t_start:6.0f}s] {size} {dtype} {task} {name} repeat {r + 1}: "
                            f"{figure(task, got[name]):,.1f} {UNITS[task]}",
                            file=sys.stderr,
                            flush=True,
                        )
                    pairs = [(n, b) for n in got if n.startswith("ours") for b in ("trl", "bare") if b in got]
                    for name, base in pairs:
                        key = f"{key_prefix(size, dtype)}{task}{name[4:]}_vs_{base}"
                        ratios_per_repeat.setdefault(key, []).append(figure(task, got[name]) / figure(task, got[base]))
                peak[dtype].append(matmul_flops(dtype))
    flops = {d: max(v) for d, v in peak.items()}
    results = {}
    for (size, dtype, task, name), runs in raw.items():
        meta = json.loads((ROOT / a.out / f"workload-{size}" / "meta.json").read_text())
        s = median_of(runs)
        s["mfu"] = model_flops(task, meta, s) / flops[dtype]  # against the peak of the same dtype
        results.setdefault(size, {}).setdefault(dtype, {}).setdefault(task, {})[name] = s
    report = {
        "ratios": {k: round(statistics.median(v), 3) for k, v in ratios_per_repeat.items()},
        "ratios_per_repeat": {k: [round(x, 3) for x in v] for k, v in ratios_per_repeat.items()},
        "results": results,
        "matmul_gflops_1_thread": {d: round(f / 1e9, 1) for d, f in flops.items()},
        "repeats": a.repeats,
        "hparams": HPARAMS,
        "steps": {s: STEPS[s] for s in sizes},
        "workloads": {s: json.loads((ROOT / a.out / f"workload-{s}" / "meta.json").read_text()) for s in sizes},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = ROOT / a.out / "report.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if a.json else table(report))


UNITS = {"sft": "tokens/s", "reward": "pairs/s", "ppo": "prompts/s"}


def number(x: float) -> str:
    """One decimal from 100 up (5,256.6), three significant digits below (0.129, 12.6)."""
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def table(report: dict) -> str:
    lines = [
        f"matmul peak (1 thread, GFLOP/s): {report['matmul_gflops_1_thread']}; median of "
        f"{report['repeats']} repeats; wall {report['wall_s']:.0f} s",
        "",
        "| size | dtype | task | contender | throughput | unit | vs TRL | vs bare | MFU | peak RSS MiB "
        "| runs (units/s) |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    rows_of = [
        (size, dtype, tasks) for size, by_dtype in report["results"].items() for dtype, tasks in by_dtype.items()
    ]
    for size, dtype, tasks in rows_of:
        prefix = key_prefix(size, dtype)
        for task, rows in tasks.items():
            for name, s in rows.items():
                value = figure(task, s)
                vs = [
                    report["ratios"].get(f"{prefix}{task}{name[4:]}_vs_{b}") if name.startswith("ours") else None
                    for b in ("trl", "bare")
                ]
                vs = [f"{v:.2f}x" if v is not None else "" for v in vs]
                lines.append(
                    f"| {size} | {dtype} | {task} | {name} | {number(value)} | {UNITS[task]} | {vs[0]} | {vs[1]} | "
                    f"{s['mfu']:.1%} | {s['peak_rss_mib']:.0f} | {s['runs']} |"
                )
            split = rows.get("ours", {}).get("split")
            if split:
                lines.append(
                    f"| {size} | {dtype} | ppo | ours: time split | generate {split['generate']:.0%} / score "
                    f"{split['score']:.0%} / train {split['train']:.0%} | | | | | | |"
                )
    lines += ["", "ratios: " + json.dumps(report["ratios"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
