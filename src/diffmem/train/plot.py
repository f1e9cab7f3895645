"""The picture of a training run: its loss by step and, with the memorization filter, the share of
samples it dropped in each epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_training(log: list[dict], filter_epochs: list[dict] | None, path: str | Path, title: str = "") -> Path:
    from ..core.figures import subplots
    from matplotlib.ticker import MaxNLocator

    rows = 2 if filter_epochs else 1
    fig, axes = subplots(rows, 1, figsize=(6.4, 2.6 * rows), squeeze=False)
    ax = axes[0, 0]
    steps = np.array([r["step"] for r in log], float)
    loss = np.array([r["loss"] for r in log], float)
    kept = np.isfinite(loss)  # nan: a step whose samples the filter all dropped
    ax.plot(steps[kept], loss[kept], color="#d63", lw=1.2, marker="." if kept.sum() < 40 else None)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss")
    if kept.any() and loss[kept].min() > 0:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=7)
    if filter_epochs:
        ax = axes[1, 0]
        share = [e["dropped"] / e["samples"] if e["samples"] else 0.0 for e in filter_epochs]
        epochs = [e["epoch"] for e in filter_epochs]
        ax.bar(epochs, share, color=["#79a" if e.get("complete", True) else "#bbb" for e in filter_epochs])
        ax.set_xlabel("epoch (grey: the last, partial)" if not filter_epochs[-1].get("complete", True) else "epoch")
        ax.set_ylabel("share of samples dropped")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(1e-3, max(share) * 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
