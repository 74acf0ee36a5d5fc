"""Loss curves as PNG (matplotlib, Agg backend: no display needed on a cluster node)."""

from __future__ import annotations

import os
from pathlib import Path

from kdlib.runtime.io import atomic_target


def pyplot():
    """matplotlib.pyplot with the Agg backend set first (no display needed on a cluster node)."""
    import matplotlib  # ~0.25 s to import with pyplot, paid only when a plot is drawn (--help, config checks never)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here, not above: the backend must be chosen before pyplot is imported

    return plt


def loss_curve(records: list[dict], keys: list[str], path: str | os.PathLike, title: str = "training loss") -> Path:
    """One line per key over `step`, log-scaled when every value is positive; written atomically."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key)
            positive = positive and min(values) > 0
    if positive and records:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def finish_bar_chart(fig, ax, path: str | os.PathLike, *, ylabel: str, title: str) -> Path:
    """The common end of every report's bar chart: labels, a y grid, the legend, written atomically as PNG."""
    plt = pyplot()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
