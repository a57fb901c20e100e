"""Peak memory of every stage at real sizes, rlhf-lit beside TRL, and the largest PPO actor that fits.

    python benchmarks/memory.py [--shapes smollm2,opt-350m] [--tasks sft,reward,ppo] [--json]
    python benchmarks/memory.py --largest opt-1.3b,opt-2.7b       # PPO actor sizes with a 350M critic

Each run is its own process (the runners of bench.py) doing two steps of the benchmark's workload
(benchmarks/common.HPARAMS: batch 8, <= 128 tokens, PPO 64 new tokens, AdamW): the optimizer's states
exist from the first step, so the second shows the peak. The figure is the process's peak RSS
(``ru_maxrss``: weights, optimizer, activations, libraries, everything). Shapes are built from config
(benchmarks/workload.SHAPES; SmolLM2's real weights where `make smollm2` converted them). Everything
computes in fp32: this CPU has no bf16 units (a SmolLM2 step runs 14.5x slower under bf16 autocast), so the
contenders' bf16 modes would measure nothing but waiting.

A watchdog stops a run whose process tree passes ``--limit-gib`` (default 22 of the machine's 24 GiB),
so the largest-actor search reports "over the limit" instead of meeting the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench import ENV, PEERS  # noqa: E402
from common import MARK  # noqa: E402

GIB = 1024**3


def contenders(task: str, names: list[str]) -> list[tuple[str, list[str]]]:
    """(name, command) of the asked contenders that apply to ``task``."""
    py, ours = sys.executable, str(HERE / "run_ours.py")
    table = {
        "ours": [py, ours, task],
        "ours_ckpt": [py, ours, task, "--grad-ckpt"],
        "ours_fp32_frozen": [py, ours, task, "--frozen-dtype", "float32"] if task == "ppo" else None,
        "trl": [str(PEERS["trl-ppo" if task == "ppo" else "trl"]), str(HERE / "run_trl.py"), task],
        "trl_ckpt": [str(PEERS["trl-ppo" if task == "ppo" else "trl"]), str(HERE / "run_trl.py"), task, "--grad-ckpt"],
    }
    out = []
    for name in names:
        cmd = table.get(name)
        if cmd is None:
            continue
        if name.startswith("trl") and not Path(cmd[0]).exists():
            print(f"note: {cmd[0]} missing: {name} left out (run benchmarks/setup_peers.sh)", file=sys.stderr)
            continue
        out.append((name, cmd))
    return out


def measure(cmd: list[str], workload: Path, limit_gib: float) -> dict:
    """Run one contender for 1 warm-up + 1 measured step; peak RSS in GiB, or ``over_limit``."""
    cmd = cmd + ["--workload", str(workload), "--steps", "1", "--warmup", "1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen, over = [0.0], [False]

    def watch() -> None:  # the tree's RSS every 0.5 s; stop the run above the limit
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / GIB
            except psutil.Error:
                break
            seen[0] = max(seen[0], rss)
            if rss > limit_gib:
                over[0] = True
                proc.kill()
                break
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    wall = round(time.perf_counter() - t0, 1)
    if over[0]:
        return {"over_limit": True, "peak_rss_gib": round(seen[0], 2), "wall_s": wall}
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        tail = "\n".join((err or out).strip().splitlines()[-12:])
        raise SystemExit(f"memory run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    rec = json.loads(lines[-1][len(MARK) :])
    return {"over_limit": False, "peak_rss_gib": round(rec["peak_rss_mib"] / 1024, 2), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2,opt-350m")
    p.add_argument("--tasks", default="sft,reward,ppo")
    p.add_argument("--contenders", default="ours,ours_ckpt,ours_fp32_frozen,trl,trl_ckpt")
    p.add_argument("--largest", default="", help="PPO actor shapes to try with a --critic-shape critic and reward")
    p.add_argument("--critic-shape", default="opt-350m")
    p.add_argument("--lora", type=int, default=8, help="--largest: LoRA rank of actor and critic (0: no LoRA row)")
    p.add_argument(
        "--no-full", action="store_true", help="--largest: LoRA rows only (full fine-tuning known not to fit)"
    )
    p.add_argument("--grad-ckpt", action="store_true", help="--largest: gradient checkpointing in every row")
    p.add_argument("--limit-gib", type=float, default=22.0)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from workload import build

    out_dir = ROOT / a.out
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    log = open(out_dir / "memory.jsonl", "a")

    def record(row: dict) -> None:
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        state = "over the limit" if row["over_limit"] else f"{row['peak_rss_gib']:.2f} GiB"
        print(f"{row['shape']} {row['task']} {row['contender']}: {state} ({row['wall_s']} s)", file=sys.stderr)

    if a.largest:
        critic = out_dir / f"workload-{a.critic_shape}"
        build(a.critic_shape, critic)
        for shape in a.largest.split(","):
            w = out_dir / f"workload-{shape}"
            build(shape, w, policy_only=True)
            base = [sys.executable, str(HERE / "run_ours.py"), "ppo", "--critic", str(critic / "reward")]
            base += ["--reward", str(critic / "reward")] + (["--grad-ckpt"] if a.grad_ckpt else [])
            ckpt = "_ckpt" if a.grad_ckpt else ""
            variants = [] if a.no_full else [(f"ours{ckpt}", base)]
            variants += [(f"ours_lora{a.lora}{ckpt}", base + ["--lora", str(a.lora)])] if a.lora else []
            for name, cmd in variants:
                task = f"ppo, {a.critic_shape} critic"
                record({"shape": shape, "task": task, "contender": name, **measure(cmd, w, a.limit_gib)})
    else:
        for shape in a.shapes.split(","):
            w = out_dir / f"workload-{shape}"
            build(shape, w)
            for task in a.tasks.split(","):
                for name, cmd in contenders(task, a.contenders.split(",")):
                    record({"shape": shape, "task": task, "contender": name, **measure(cmd, w, a.limit_gib)})
    if a.json:
        print(json.dumps({"rows": rows, "limit_gib": a.limit_gib}, indent=2))
        return
    print("| shape | task | contender | peak RSS GiB | wall s |\n|---|---|---|---:|---:|")
    for r in rows:
        peak = f"> {a.limit_gib:g} (stopped)" if r["over_limit"] else f"{r['peak_rss_gib']:.2f}"
        print(f"| {r['shape']} | {r['task']} | {r['contender']} | {peak} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
