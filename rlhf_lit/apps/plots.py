"""Plots of PPO runs from their metrics CSV: gold and proxy reward against KL (Gao et al. 2022, fig. 1)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_series(path: Path, keys: list[str]) -> dict[str, list[float]]:
    """Columns of a Lightning CSV log, keeping rows where every key is present."""
    out: dict[str, list[float]] = {k: [] for k in keys}
    with open(path) as f:
        for row in csv.DictReader(f):
            if all(row.get(k) not in (None, "") for k in keys):
                for k in keys:
                    out[k].append(float(row[k]))
    return out


def smooth(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def reward_vs_kl(runs: dict[str, Path], out: Path, title: str = "", window: int = 10) -> Path:
    """One line per run in two panels: gold (monitor) score and proxy (reward model) score against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab20").colors  # enough distinct colours for a study's runs
    for ax in (gold_ax, proxy_ax):
        ax.set_prop_cycle(color=colors[::2] + colors[1::2])
    for name, path in runs.items():
        s = read_series(Path(path), ["objective/kl", "objective/scores"])
        if not s["objective/kl"]:
            continue
        kl = smooth(s["objective/kl"], window)
        proxy_ax.plot(kl, smooth(s["objective/scores"], window), label=name)
        g = read_series(Path(path), ["objective/kl", "objective/monitor_scores"])
        if g["objective/kl"]:
            gold_ax.plot(smooth(g["objective/kl"], window), smooth(g["objective/monitor_scores"], window), label=name)
    if not gold_ax.lines:  # no gold monitor (a real task): the proxy panel alone
        gold_ax.text(
            0.5,
            0.5,
            "no gold reward monitored\n(a task without a known true reward)",
            ha="center",
            va="center",
            transform=gold_ax.transAxes,
            color="0.4",
        )
        gold_ax.set_xticks([]), gold_ax.set_yticks([])
    gold_ax.set(xlabel="KL(policy || reference), nats per response", ylabel="gold reward", title="gold (true) reward")
    proxy_ax.set(
        xlabel="KL(policy || reference), nats per response",
        ylabel="reward-model score (normalised)",
        title="proxy reward",
    )
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "reward against KL over PPO training")
    return save(fig, out)


def save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def final_vs_kl(rows: dict[str, list[dict]], out: Path, ylabel: str, title: str = "") -> Path:
    """Each method's held-out score against its KL to the SFT policy at the end of training: one point
    per seed, the mean with ± one std bars, and the SFT policy at KL 0 (from the evaluation summaries)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.get_cmap("tab10").colors
    sft = [
        s["sft"]["gold_reward_mean"] for runs in rows.values() for s in runs if "gold_reward_mean" in s.get("sft", {})
    ]
    if sft:
        ax.axhline(statistics.mean(sft), color="0.5", ls="--", lw=1, label=f"SFT ({statistics.mean(sft):.3f})")
    for i, (name, runs) in enumerate(rows.items()):
        final = [s.get("final") or s.get("ppo", {}) for s in runs]  # each run's last trained policy
        pts = [(f["kl"], f["gold_reward_mean"]) for f in final if {"kl", "gold_reward_mean"} <= set(f)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        c = colors[i % len(colors)]
        ax.scatter(xs, ys, color=c, alpha=0.35, s=18)
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        ax.errorbar(
            statistics.mean(xs), statistics.mean(ys), xerr=sd(xs), yerr=sd(ys), fmt="o", color=c, capsize=3, label=name
        )
    ax.set(xlabel="KL(policy || SFT) on held-out prompts, nats per response", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "held-out score against KL (points: seeds; bars: mean ± std)")
    return save(fig, out)
