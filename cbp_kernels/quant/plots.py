"""PNG figures of a quantization run in the style of the paper's Figures 3-11, from ``fit``'s
history: accuracy and CFS per epoch (with the g steps for CBP, the temperature for the
sigmoid-sum quantizer), weight histograms at chosen epochs, and the bar chart of
``cbp-quantize compare``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_history", "plot_weight_histograms", "plot_comparison"]

# Schedules drawn as steps in the lower panel of plot_history, when recorded (log scale).
_SCHEDULES = ("g", "temperature")


def plot_history(history: Sequence[dict], path: str | Path, metric: str = "accuracy") -> Path:
    """Over epochs: ``metric`` and CFS (each if recorded; twin axes when both are) and, in a
    lower panel, the first recorded schedule of ``g`` (CBP) / ``temperature`` (sigmoid-sum)
    as steps. Records without any of them (e.g. CQ's) give one panel of ``loss``.
    Returns the PNG's path."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [r["epoch"] + 1 for r in history]
    recorded = lambda key: all(key in r for r in history)  # noqa: E731
    curves = [(key, color) for key, color in ((metric, "tab:blue"), ("cfs", "tab:red")) if recorded(key)]
    curves = curves or [("loss", "tab:blue")]
    schedule = next((key for key in _SCHEDULES if recorded(key)), None)
    if schedule is None:
        fig, top = plt.subplots(figsize=(6, 4))
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, height_ratios=(2, 1))
        bottom.step(epochs, [r[schedule] for r in history], where="post", color="tab:green")
        bottom.set_yscale("log")
        bottom.set_ylabel(schedule)
    for i, (key, color) in enumerate(curves):
        axis = top.twinx() if i else top
        axis.plot(epochs, [r[key] for r in history], color=color, label=key)
        axis.set_ylabel("CFS" if key == "cfs" else key, color=color)
    (top if schedule is None else bottom).set_xlabel("epoch")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(names: Sequence[str], accuracy: Sequence[float], weight_bits: Sequence[float],
                    path: str | Path) -> Path:
    """Two bar panels, one bar per method: test accuracy (%) and weight memory (Kb = 10^3
    bits, log scale). Returns the PNG's path."""
    if not names or not len(names) == len(accuracy) == len(weight_bits):
        raise ValueError(f"names, accuracy and weight_bits need one entry per method, got {len(names)}, "
                         f"{len(accuracy)}, {len(weight_bits)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.3 * len(names), 4))
    colors = [f"C{i}" for i in range(len(names))]
    for ax, values, label in ((left, accuracy, "test accuracy (%)"),
                              (right, [b / 1e3 for b in weight_bits], "weight memory (Kb)")):
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
    right.set_yscale("log")
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
