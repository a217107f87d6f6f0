"""The PNG report of ``kvmesh bench serve``: time to first token and inter-token latency,
per system, per group of requests (the turn of a conversation, else the request kind),
as box plots with every sample drawn over them."""

from __future__ import annotations

import random
from pathlib import Path

from kvmesh.bench.serve_client import Run

COLORS = {"kvmesh": "tab:blue", "vllm": "tab:orange"}


def _groups(runs: dict[str, Run]) -> list[str]:
    seen: dict[str, float] = {}
    for run in runs.values():
        for r in run.records:
            seen.setdefault(r.group, r.start_s)
    # turns in order ("turn 2" before "turn 10"); other groups by when they first came
    return sorted(seen, key=lambda g: (int(g.split()[1]) if g.startswith("turn ") else 0, seen[g], g))


def plot(runs: dict[str, Run], path: str | Path, title: str) -> Path:
    """Write the report to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(runs)
    names = list(runs)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(groups) * len(names)), 8), squeeze=False)
    jitter = random.Random(0)
    for ax, (label, values_of) in zip(axes[:, 0], (
            ("time to first token (ms)", lambda r: [r.ttft_s * 1000]),
            ("inter-token latency (ms)", lambda r: [g * 1000 for g in r.itl_s]))):
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            data = [[v for r in runs[name].records if r.ok and r.group == g for v in values_of(r)]
                    for g in groups]
            positions = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
            kept = [(p, d) for p, d in zip(positions, data) if d]
            if not kept:
                continue
            box = ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], widths=width * 0.8,
                             showfliers=False, patch_artist=True, medianprops={"color": "black"})
            for patch in box["boxes"]:
                patch.set(facecolor=COLORS.get(name, "tab:gray"), alpha=0.35)
            for p, d in kept:
                xs = [p + jitter.uniform(-width * 0.3, width * 0.3) for _ in d]
                ax.scatter(xs, d, s=6, color=COLORS.get(name, "tab:gray"), alpha=0.6,
                           label=name if p == kept[0][0] else None)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
