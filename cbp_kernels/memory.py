"""Weight-memory report as the CBP paper defines it (Tables 1-3): every synaptic weight at
its stored precision, a quantized layer's at ceil(log2 |Q|) bits, the others (by default the
first and the last weight layer, which the paper does not quantize) at 32 bits (FP32).
Totals in Mb = 10^6 bits and Kb = 10^3 bits, as the paper's tables.

Checked against the paper: SEW-ResNet-18 374 / 27.8 / 39.0 Mb (FP32 / binary / ternary),
SEW-ResNet-34 697 / 37.9 / 59.2, 7B-Net 4.16 Mb / 159 Kb / 288 Kb, Wide-7B-Net 40.2 / 1.33 /
2.58 Mb, AlexNet 677 / 21.6 / 42.7 Mb, all with biases not counted; VGG-16 (CIFAR-10)
471 / 15.1 / 29.8 Mb with its biases counted at FP32 (``biases=True``: SNN-Calibration
trains them, the paper's Table 2).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .nn.bitconv import PackedConv2d, PackedLinear
from .ops.levels import LevelSet

_PACKED = (PackedConv2d, PackedLinear)

__all__ = ["LayerMemory", "MemoryReport", "memory_report", "bits_per_weight"]

FP32_BITS = 32


def bits_per_weight(levels) -> int:
    """ceil(log2 |Q|) for a level set Q (a sequence of values) or its size (an int >= 2)."""
    n = levels if isinstance(levels, int) else len(set(float(q) for q in levels))
    if isinstance(n, bool) or n < 2:
        raise ValueError(f"a level set needs at least 2 distinct levels, got {levels!r}")
    return math.ceil(math.log2(n))


@dataclass(frozen=True)
class LayerMemory:
    """One weight layer: its weights (and biases, when counted) and their bits."""

    name: str
    kind: str
    weights: int
    biases: int
    bits_per_weight: int

    @property
    def bits(self) -> int:
        return self.weights * self.bits_per_weight + self.biases * FP32_BITS


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer and total weight memory; ``str()`` is the table, ``total_mb`` the headline."""

    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def total_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def total_mb(self) -> float:
        return self.total_bits / 1e6

    @property
    def total_kb(self) -> float:
        return self.total_bits / 1e3

    def as_dict(self) -> dict:
        return {"total_bits": self.total_bits, "total_mb": self.total_mb,
                "layers": [dict(name=l.name, kind=l.kind, weights=l.weights, biases=l.biases,
                                bits_per_weight=l.bits_per_weight, bits=l.bits) for l in self.layers]}

    def table(self) -> str:
        name_w = max([len("layer")] + [len(l.name) for l in self.layers])
        head = f"{'layer':<{name_w}}  {'type':<10} {'weights':>12} {'biases':>8} {'bits/w':>6} {'Mb':>10}"
        rows = [head, "-" * len(head)]
        for l in self.layers:
            rows.append(f"{l.name:<{name_w}}  {l.kind:<10} {l.weights:>12,} {l.biases:>8,} "
                        f"{l.bits_per_weight:>6} {l.bits / 1e6:>10.4f}")
        rows.append("-" * len(head))
        total_w = sum(l.weights for l in self.layers)
        rows.append(f"{'total':<{name_w}}  {'':<10} {total_w:>12,} {sum(l.biases for l in self.layers):>8,} "
                    f"{'':>6} {self.total_mb:>10.4f}  ({self.total_mb:.3g} Mb = {self.total_kb:.4g} Kb)")
        return "\n".join(rows)

    __str__ = table


def _weight_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear) + _PACKED):
            yield name, m


def _layer_memory(name, m, bits, biases) -> LayerMemory:
    n_bias = m.bias.numel() if (biases and m.bias is not None) else 0
    n_weight = math.prod(m.weight_shape) if isinstance(m, _PACKED) else m.weight.numel()
    return LayerMemory(name, type(m).__name__, n_weight, n_bias, bits)


def memory_report(model: nn.Module, levels: Sequence[float] | int | None = None, *,
                  fp32_layers: Iterable[str] | None = None, biases: bool = False,
                  print_table: bool = True) -> MemoryReport:
    """Weight memory of ``model`` (every Conv / Linear layer, in registration order).

    Args:
        model: any module; its ``nn.ConvNd`` / ``nn.Linear`` layers (``LIFConv2d`` included)
            hold the weights; packed layers (``PackedConv2d`` / ``PackedLinear``, e.g. from
            ``LIFConv2d.pack()``) count at their own 1 or 2 bits per weight.
        levels: the level set Q the quantized layers use (e.g. ``(-1, 1)``, ``(-1, 0, 1)``) or
            its size; ``None``: a layer is quantized only if it has ``weight_levels`` set
            (``LIFConv2d(weight_levels=...)``), at that set's precision.
        fp32_layers: names of the layers kept in FP32; default the first and the last weight
            layer (the paper's rule). Ignored for layers when ``levels`` is ``None``.
        biases: count biases (always FP32); the paper counts them only for VGG-16.
        print_table: print the table.

    Returns:
        ``MemoryReport`` (``.layers``, ``.total_bits``, ``.total_mb``, ``.as_dict()``, ``str()``).
    """
    layers = list(_weight_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv / Linear layer")
    if fp32_layers is None:
        keep = {layers[0][0], layers[-1][0]}
    else:
        keep = set(fp32_layers)
        unknown = keep - {name for name, _ in layers}
        if unknown:
            raise ValueError(f"fp32_layers names no weight layer: {sorted(unknown)}")
    bits = None if levels is None else bits_per_weight(levels)
    rows = []
    for name, m in layers:
        own = getattr(m, "weight_levels", None)
        if isinstance(m, _PACKED):  # packed layers store their own precision
            b = LevelSet(m.levels).planes
        elif levels is None:
            b = FP32_BITS if own is None else bits_per_weight(own)
        else:
            b = FP32_BITS if name in keep else bits
        rows.append(_layer_memory(name, m, b, biases))
    report = MemoryReport(rows)
    if print_table:
        print(report.table())
    return report
