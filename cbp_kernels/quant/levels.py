"""Level sets Q: the values (times a per-layer scale s) that quantized weights may take.

A level set is given by name (``"binary"`` = {-1, 1}, ``"ternary"`` = {-1, 0, 1}) or as a
strictly increasing sequence of finite numbers such as ``[-2, -1, 0, 1]``. It is stored
unscaled as a 1-D float32 tensor; the scale s = mean(|W|) of each layer multiplies it.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["LEVEL_SETS", "resolve_levels"]

LEVEL_SETS: dict[str, tuple[float, ...]] = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0)}


def resolve_levels(levels: str | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The level set as a sorted 1-D float32 CPU tensor ``[n_q]`` (n_q >= 2).

    Raises ValueError for an unknown name, an empty or one-element set, a non-finite value,
    an unsorted set or a duplicate value; TypeError for anything that is not a name, a
    sequence of real numbers or a 1-D tensor.
    """
    if isinstance(levels, str):
        if levels not in LEVEL_SETS:
            raise ValueError(f"levels must be one of {sorted(LEVEL_SETS)} or a list of numbers, got {levels!r}")
        values = list(LEVEL_SETS[levels])
    elif isinstance(levels, torch.Tensor):
        if levels.dim() != 1 or levels.is_complex() or levels.dtype == torch.bool:
            raise TypeError(f"levels must be a 1-D real tensor, got shape {tuple(levels.shape)} dtype {levels.dtype}")
        values = [float(v) for v in levels.tolist()]
    elif isinstance(levels, Sequence):
        bad = [v for v in levels if not isinstance(v, numbers.Real) or isinstance(v, bool)]
        if bad:
            raise TypeError(f"levels must hold real numbers, got {bad[0]!r}")
        values = [float(v) for v in levels]
    else:
        raise TypeError(f"levels must be 'binary', 'ternary' or a sequence of numbers, got {type(levels).__name__}")
    if len(values) < 2:
        raise ValueError(f"levels needs at least two values, got {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"levels must be finite, got {values}")
    for lo, hi in zip(values, values[1:]):
        if lo == hi:
            raise ValueError(f"levels has the duplicate value {lo}: {values}")
        if lo > hi:
            raise ValueError(f"levels must be sorted increasingly, got {values} ({lo} before {hi})")
    return torch.tensor(values, dtype=torch.float32)

