"""PNG figures of a CBP run in the style of the paper's Figures 3-11, from ``fit``'s history:
accuracy and CFS per epoch (with the g steps), and weight histograms at chosen epochs."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_history", "plot_weight_histograms"]


def plot_history(history: Sequence[dict], path: str | Path, metric: str = "accuracy") -> Path:
    """Two panels over epochs: ``metric`` (if recorded) and CFS on twin axes; g as steps.
    Returns the PNG's path."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [r["epoch"] + 1 for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, height_ratios=(2, 1))
    cfs_axis = top
    if all(metric in r for r in history):
        top.plot(epochs, [r[metric] for r in history], color="tab:blue", label=metric)
        top.set_ylabel(metric, color="tab:blue")
        cfs_axis = top.twinx()
    cfs_axis.plot(epochs, [r["cfs"] for r in history], color="tab:red", label="CFS")
    cfs_axis.set_ylabel("CFS", color="tab:red")
    bottom.step(epochs, [r["g"] for r in history], where="post", color="tab:green")
    bottom.set_yscale("log")
    bottom.set_ylabel("g")
    bottom.set_xlabel("epoch")
    fig.tight_layout()
    return _save(fig, path)


def plot_weight_histograms(history: Sequence[dict], epochs: Sequence[int], path: str | Path,
                           levels: Sequence[float] | None = None) -> Path:
    """One histogram of W/s (all quantized layers) per chosen epoch (0-based, as in the
    records), levels marked by dashed lines. Returns the PNG's path."""
    by_epoch = {r["epoch"]: r for r in history}
    missing = [e for e in epochs if e not in by_epoch]
    if not epochs or missing:
        raise ValueError(f"epochs must name recorded epochs {sorted(by_epoch)}, got {list(epochs)}")
    fig, axes = plt.subplots(1, len(epochs), figsize=(3 * len(epochs), 2.6), squeeze=False)
    for ax, epoch in zip(axes[0], epochs):
        record = by_epoch[epoch]
        lo, hi = record["hist_range"]
        counts = record["weight_hist"]
        width = (hi - lo) / len(counts)
        ax.bar([lo + (i + 0.5) * width for i in range(len(counts))], counts, width=width, color="tab:blue")
        for q in levels or ():
            ax.axvline(q, color="gray", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"epoch {epoch + 1}")
        ax.set_xlabel("w / s")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
