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
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

__all__ = ["plot_history", "plot_weight_histograms", "plot_comparison"]

# Schedules drawn as steps in the lower panel of plot_history, when recorded (linear axis).
_SCHEDULES = {"g": "g (window parameter)", "temperature": "temperature"}
_LABELS = {"accuracy": "test accuracy (%)", "cfs": "CFS", "loss": "training loss"}


def _integer_epochs(axis) -> None:
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _tight(axis, values: Sequence[float], unit_margin: float) -> None:
    """A y range that shows differences of ``values`` (a 97.5 vs 98.9 accuracy apart, not
    squeezed at the top of 0..100): the data's range plus a margin of at least ``unit_margin``."""
    lo, hi = min(values), max(values)
    pad = max(unit_margin, 0.15 * (hi - lo))
    axis.set_ylim(lo - pad, hi + pad)


def plot_history(history: Sequence[dict], path: str | Path, metric: str = "accuracy", title: str | None = None) -> Path:
    """Over epochs (integer ticks, 1-based): ``metric`` and CFS (each if recorded; twin axes
    with one legend when both are) and, in a lower panel on a linear axis, the first recorded
    schedule of ``g`` (CBP) / ``temperature`` (sigmoid-sum) as steps. Records without any of
    them (e.g. CQ's) give one panel of ``loss``. ``title`` (e.g. run and stage) heads the
    figure. Returns the PNG's path."""
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
        values = [r[schedule] for r in history]
        bottom.step(epochs, values, where="post", color="tab:green", marker=".", label=_SCHEDULES[schedule])
        bottom.set_ylim(0, max(values) * 1.1 + 1)
        bottom.set_ylabel(schedule)
        bottom.yaxis.set_major_locator(MaxNLocator(integer=schedule == "g"))
        bottom.legend(loc="upper left", fontsize=8)
        bottom.grid(alpha=0.3)
    lines = []
    for i, (key, color) in enumerate(curves):
        axis = top.twinx() if i else top
        values = [r[key] for r in history]
        lines += axis.plot(epochs, values, color=color, marker="o", markersize=3, label=_LABELS.get(key, key))
        axis.set_ylabel(_LABELS.get(key, key), color=color)
        if key == metric and metric == "accuracy":
            _tight(axis, values, 0.5)
    top.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    top.grid(alpha=0.3)
    _integer_epochs(top)
    (top if schedule is None else bottom).set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(names: Sequence[str], accuracy: Sequence[float], weight_bits: Sequence[float],
                    path: str | Path, title: str | None = None) -> Path:
    """Two panels, one bar per method: test accuracy (%) on an axis fitted to the values (it
    does not start at 0, so 97.5 vs 98.9 shows) and weight memory (Kb = 10^3 bits, log
    scale), each bar labelled with its value. Returns the PNG's path."""
    if not names or not len(names) == len(accuracy) == len(weight_bits):
        raise ValueError(f"names, accuracy and weight_bits need one entry per method, got {len(names)}, "
                         f"{len(accuracy)}, {len(weight_bits)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.3 * len(names), 4))
    colors = [f"C{i}" for i in range(len(names))]
    for ax, values, label in ((left, accuracy, "test accuracy (%, axis not from 0)"),
                              (right, [b / 1e3 for b in weight_bits], "weight memory (Kb, log scale)")):
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
    _tight(left, accuracy, 0.5)
    right.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_weight_histograms(history: Sequence[dict], epochs: Sequence[int], path: str | Path,
                           levels: Sequence[float] | None = None, title: str | None = None) -> Path:
    """One histogram of W/s (all quantized layers, log count axis) per chosen epoch
    (0-based, as in the records), levels marked by dashed lines; ``title`` heads the
    figure. Returns the PNG's path."""
    by_epoch = {r["epoch"]: r for r in history}
    missing = [e for e in epochs if e not in by_epoch]
    if not epochs or missing:
        raise ValueError(f"epochs must name recorded epochs {sorted(by_epoch)}, got {list(epochs)}")
    fig, axes = plt.subplots(1, len(epochs), figsize=(3 * len(epochs), 2.8), squeeze=False, sharey=True)
    for ax, epoch in zip(axes[0], epochs):
        record = by_epoch[epoch]
        lo, hi = record["hist_range"]
        counts = record["weight_hist"]
        width = (hi - lo) / len(counts)
        ax.bar([lo + (i + 0.5) * width for i in range(len(counts))], counts, width=width, color="tab:blue")
        for i, q in enumerate(levels or ()):
            ax.axvline(q, color="gray", linestyle="--", linewidth=0.8, label="levels" if i == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"after epoch {epoch + 1}")
        ax.set_xlabel("w / s")
    axes[0][0].set_ylabel("weights (log scale)")
    if levels:
        axes[0][0].legend(loc="upper center", fontsize=8)
    if title:
        fig.suptitle(f"{title}: weights in level units")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
