"""The result tables of a run (plain text, markdown), formatted from its rows: the plain dicts
of ``RunResult.rows`` / ``summary.json`` (one per stage: ``precision``, ``method``,
``accuracy``, ``weight_bits``, ... and ``layers`` for the quantized stages)."""
from __future__ import annotations

from .config import CQ_WEIGHT_BITS, METHODS

__all__ = ["format_memory", "format_table", "format_compare", "format_layers", "result_table", "row_name"]


def format_memory(bits: float) -> str:
    """Weight memory as the paper writes it: Mb = 10^6 bits, Kb = 10^3 bits, 3 significant digits."""
    return f"{bits / 1e6:.3g}Mb" if bits >= 1e6 else f"{bits / 1e3:.3g}Kb"


def _aligned(head: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """``head``, a rule and ``body`` as whitespace-aligned lines."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]


def format_table(model: str, data: str, rows: list[dict], method: str = "cbp") -> str:
    """The result table of a ``run`` in the layout of the paper's Table 1 (one row per
    precision); for CBP rows the CFS training reached (before the weights are forced onto the
    levels, which makes it 0) and the share of weights forcing moved (``CBPQuantizer.finalize``)."""
    head = ("Precision", "Accuracy (%)", "Packed model (%)", "Same predictions", "Weight memory", "CFS trained",
            "Forcing moved")
    body = []
    for r in rows:
        packed = "packed_accuracy" in r
        body.append((
            r["precision"].capitalize() if r["precision"] in ("binary", "ternary") else r["precision"],
            f"{r['accuracy']:.2f}",
            f"{r['packed_accuracy']:.2f}" if packed else "-",
            ("yes" if r["same_predictions"] else f"NO ({r['mismatches']})") if packed else "-",
            format_memory(r["weight_bits"]),
            f"{r['cfs_trained']:.3g}" if r.get("cfs_trained") is not None else "-",
            f"{100 * r['forced_fraction']:.1f}%" if r.get("forced_fraction") is not None else "-",
        ))
    title = f"{model} on {data}: {METHODS[method][0]}-quantized weights"
    title += " (cf. the paper's Table 1)" if method == "cbp" else ""
    return "\n".join([title] + _aligned(head, body))


def format_layers(row: dict) -> str:
    """The per-layer results of a quantized stage's row: scale s, CFS before forcing (CBP)
    and the fraction of weights that forcing W <- Q(W) moved, with their mean distance in
    level units |W - Q(W)| / s."""
    body = [(name, f"{r['scale']:.4g}", "-" if r.get("cfs") is None else f"{r['cfs']:.3g}",
             f"{100 * r['moved_fraction']:.1f}", f"{r['mean_shift']:.3g}", str(r["weights"]))
            for name, r in row["layers"].items()]
    head = ("Layer", "Scale s", "CFS", "Moved by forcing (%)", "Mean |W-Q(W)|/s", "Weights")
    return "\n".join(_aligned(head, body))


def row_name(row: dict) -> str:
    """A result row's name in the comparison: ``FP32``, ``CBP binary``, ``Sigmoid-sum ternary``, ``CQ 8-bit``."""
    method = row.get("method", "cbp")
    return "FP32" if method == "fp32" else f"{METHODS[method][0]} {row['precision']}"


def format_compare(model: str, data: str, timesteps: int, rows: list[dict]) -> str:
    """The markdown table of ``cbp-quantize compare``: one row per method (and level set),
    the FP32 model first; for CBP rows the CFS training reached (before forcing), packed =
    float predictions for packable rows."""
    lines = [f"**{model} on {data}, T={timesteps}: weight quantization methods compared** (test accuracy; weight "
             "memory as the paper's Table 1: quantized layers at ceil(log2 |Q|) bits, first and last layers FP32; "
             f"CQ: every layer at {CQ_WEIGHT_BITS} bits)", "",
             "| Method | Accuracy (%) | Weight memory | Seconds / epoch | CFS trained | Packed = float predictions |",
             "|---|---:|---:|---:|---:|---|"]
    notes = []
    for r in rows:
        seconds = r.get("seconds_per_epoch")
        same = ("yes" if r["same_predictions"] else f"NO ({r['mismatches']} differ)") if "same_predictions" in r else "-"
        cfs = f"{r['cfs_trained']:.3g}" if r.get("cfs_trained") is not None else "-"
        lines.append(f"| {row_name(r)} | {r['accuracy']:.2f} | {format_memory(r['weight_bits'])} | "
                     f"{'-' if seconds is None else f'{seconds:.2f}'} | {cfs} | {same} |")
        if r.get("method") == "fp32":
            notes.append("FP32: the pre-trained spiking DigitsNet every method but CQ starts from (its seconds are "
                         "of the FP32 pre-training).")
        if r.get("method") == "cq":
            notes.append(f"CQ: a clamp-and-quantize ANN trained {r['epochs']} epochs, converted to an IF SNN "
                         f"(T={r['timesteps']}) with {r['bits_per_weight']}-bit fixed-point weights; ANN accuracy "
                         f"{r['ann_accuracy']:.2f}%, the SNN predicts as the ANN on {100 * r['agreement']:.1f}% of "
                         "the test set.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def result_table(cfg: dict, rows: list[dict]) -> str:
    """The table of a run: ``format_compare`` for ``compare``, else ``format_table``."""
    method = cfg.get("method", "cbp")
    if method == "compare":
        return format_compare(cfg["model"], cfg["data"], cfg["timesteps"], rows)
    return format_table(cfg["model"], cfg["data"], rows, method)
