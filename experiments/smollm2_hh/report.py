"""Publish a smollm2-hh pipeline run: ``python experiments/smollm2_hh/report.py runs/smollm2-hh``.

Copies the run's summary.json and reward-vs-KL plot into ``experiments/smollm2_hh/results/`` and writes
``results.md``: the reward model's held-out accuracy with its 95% interval, the reward-model score and
KL of the SFT, PPO and PPO-EMA policies on held-out prompts, wall time per stage, and the before/after
answers (the same held-out prompts, the same sampling seed).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def table(s: dict) -> str:
    rm, sft = s["reward"], s["sft"]
    lo, hi = rm.get("heldout_accuracy_vs_labels_ci95", [float("nan")] * 2)
    ppl = sft["final_metrics"].get("val/ppl", float("nan"))
    accuracy = f"{rm['heldout_accuracy_vs_labels']:.3f} [95% CI {lo:.3f}, {hi:.3f}]"
    lines = [
        "| stage | figure | value |",
        "|---|---|---:|",
        f"| SFT | held-out loss (perplexity) | {sft['eval_loss']:.3f} ({ppl:.2f}) |",
        f"| reward | held-out pair accuracy vs HH labels ({rm['heldout_pairs']} pairs) | {accuracy} |",
    ]
    for name in ("sft", "ppo", "ppo_ema"):
        p = s.get(name, {})
        if "rm_score_mean" in p:
            win = f", win rate vs SFT {p['win_rate_vs_sft_rm']:.3f}" if "win_rate_vs_sft_rm" in p else ""
            value = f"{p['rm_score_mean']:.3f} ({p['rm_score_std']:.3f}), KL {p['kl']:.3f}"
            what = f"reward-model score on {p['n']} held-out prompts (std), KL to SFT{win}"
            lines.append(f"| {name} policy | {what} | {value}, {p['response_len_mean']:.1f} tokens |")
    if "rm_score_mean" in s.get("ppo", {}):
        gain = s["ppo"]["rm_score_mean"] - sft["rm_score_mean"]
        in_std = gain / sft["rm_score_std"]
        lines.append(f"| PPO - SFT | reward-model score gain (in SFT std) | {gain:+.3f} ({in_std:+.2f}) |")
    stages = [k for k in ("sft", "reward", "ppo") if "wall_s" in s.get(k, {})]
    walls = ", ".join(f"{k} {s[k]['wall_s'] / 60:.1f} min" for k in stages)
    lines.append(f"| all | wall time per stage (one CPU thread) | {walls} |")
    return "\n".join(lines)


def answers(s: dict) -> str:
    before = s["sft"].get("examples", [])
    after = {e["prompt"]: e["response"] for e in s.get("ppo", {}).get("examples", [])}
    out = []
    for i, e in enumerate(before, 1):
        last = e["prompt"].rstrip().rsplit("Human:", 1)[-1].replace("Assistant:", "").strip()
        out += [f"{i}. **Human:** {last}", f"   - SFT: {e['response'].strip()!r}",
                f"   - PPO: {after.get(e['prompt'], '').strip()!r}"]  # fmt: skip
    return "\n".join(out)


def main(run: str) -> None:
    run_dir = Path(run)
    s = json.loads((run_dir / "summary.json").read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "summary.json", OUT / "summary.json")
    if (run_dir / "reward_vs_kl.png").exists():
        shutil.copy(run_dir / "reward_vs_kl.png", OUT / "reward_vs_kl.png")
    text = f"# smollm2-hh: results\n\n{table(s)}\n\n## Before / after (held-out prompts, same seed)\n\n{answers(s)}\n"
    (OUT / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-hh")
