"""Level sets Q: the values (times a per-layer scale s) that quantized weights may take.

``LevelSet`` is the one home of this concept: the names (``"binary"`` = {-1, 1},
``"ternary"`` = {-1, 0, 1}) and their values, the validation of a user's set, and what
follows from the values (how a weight of the set is stored). Every layer above (nn, quant,
export, the CLI) takes a name, a sequence of numbers, a 1-D tensor or a ``LevelSet`` and
turns it into a ``LevelSet`` once, at its public boundary.

A weight on the set is ``w = s * Q[k]``; ``k`` (0 <= k < len(Q), Q sorted increasingly) is
its *code*. Stored packed, binary and ternary weights are popcount bit planes
(``cbp_kernels.ops.bitconv``); any other set is stored as ``bits``-bit codes.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["LevelSet", "NAMED_LEVEL_SETS", "resolve_levels"]

# The named sets, and the number of popcount bit planes each packs into (bitconv's format).
NAMED_LEVEL_SETS: dict[str, tuple[float, ...]] = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0)}
_POPCOUNT_PLANES = {"binary": 1, "ternary": 2}


class LevelSet:
    """A validated level set: sorted, distinct, finite, at least two values.

    ``LevelSet(levels)`` takes a name (``"binary"`` / ``"ternary"``), a sequence of real
    numbers such as ``[-2, -1, 0, 1]``, a 1-D real tensor or another ``LevelSet``. A set equal
    to a named one gets its name whatever way it was given.

    Attributes / properties:
        values: tuple of floats (float32 values: the sets are stored as float32 everywhere).
        name: ``"binary"``, ``"ternary"`` or None (a custom set).
        label: the name, or ``"levels" + "_".join(values)`` (e.g. ``levels-2_-1_0_1``).
        popcount: True for binary / ternary (the sets the popcount kernels run).
        planes: popcount bit planes per weight (1 binary, 2 ternary); None otherwise.
        bits: ceil(log2 len(Q)) bits per weight code (the paper's weight memory).

    Raises:
        ValueError: an unknown name, fewer than two values, a non-finite value, an unsorted
            set or a duplicate value. TypeError: anything else than the inputs above.
    """

    __slots__ = ("values", "name")

    def __init__(self, levels: str | Sequence[float] | torch.Tensor | LevelSet):
        if isinstance(levels, LevelSet):
            values = levels.values
        elif isinstance(levels, str):
            if levels not in NAMED_LEVEL_SETS:
                raise ValueError(f"levels must be one of {sorted(NAMED_LEVEL_SETS)} or a list of numbers, "
                                 f"got {levels!r}")
            values = NAMED_LEVEL_SETS[levels]
        elif isinstance(levels, torch.Tensor):
            if levels.dim() != 1 or levels.is_complex() or levels.dtype == torch.bool:
                raise TypeError(f"levels must be a 1-D real tensor, got shape {tuple(levels.shape)} "
                                f"dtype {levels.dtype}")
            values = levels.detach().to("cpu", torch.float32).tolist()
        elif isinstance(levels, Sequence):
            bad = [v for v in levels if not isinstance(v, numbers.Real) or isinstance(v, bool)]
            if bad:
                raise TypeError(f"levels must hold real numbers, got {bad[0]!r}")
            values = levels
        else:
            raise TypeError(f"levels must be 'binary', 'ternary' or a sequence of numbers, "
                            f"got {type(levels).__name__}")
        values = tuple(float(torch.tensor(float(v), dtype=torch.float32)) for v in values)
        _check(values)
        self.values = values
        self.name = next((n for n, v in NAMED_LEVEL_SETS.items() if v == values), None)

    @property
    def label(self) -> str:
        return self.name or "levels" + "_".join(f"{v:g}" for v in self.values)

    @property
    def popcount(self) -> bool:
        return self.name in _POPCOUNT_PLANES

    @property
    def planes(self) -> int | None:
        return _POPCOUNT_PLANES.get(self.name)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.values))))

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The values as a 1-D float32 tensor ``[len(Q)]``."""
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    def encode(self, w: torch.Tensor, scale: float | torch.Tensor, name: str = "weight") -> torch.Tensor:
        """The codes k (int8, ``w``'s shape) of a weight on the set: ``w == scale * Q[k]``
        exactly in float32 (the product the quantize op forms). ``scale`` > 0.

        Raises ValueError naming the first element of ``w`` (called ``name``) on no level."""
        if len(self.values) > 128:
            raise ValueError(f"levels has {len(self.values)} values: codes hold at most 128")
        w = w.detach().to(torch.float32)
        lv = self.tensor(w.device) * torch.as_tensor(scale, dtype=torch.float32, device=w.device).reshape(())
        codes = torch.bucketize(w, (lv[:-1] + lv[1:]) * 0.5, right=True)  # k = #{j : w >= m_j}
        bad = lv[codes] != w
        if bool(bad.any()):
            idx = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{name} is not on scale * {self.label} levels {list(self.values)} with "
                             f"scale={float(scale)}: {name}{idx} = {w[tuple(idx)].item()}")
        return codes.to(torch.int8)

    def decode(self, codes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """The float32 weight ``scale * Q[codes]`` (exact inverse of ``encode``)."""
        lv = self.tensor(codes.device) * torch.as_tensor(scale, dtype=torch.float32, device=codes.device).reshape(())
        return lv[codes.long()]

    def __len__(self) -> int:
        return len(self.values)

    def __eq__(self, other) -> bool:
        return isinstance(other, LevelSet) and other.values == self.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return f"LevelSet({self.name!r})" if self.name else f"LevelSet({list(self.values)})"


def _check(values: tuple[float, ...]) -> None:
    if len(values) < 2:
        raise ValueError(f"levels needs at least two values, got {list(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"levels must be finite, got {list(values)}")
    for lo, hi in zip(values, values[1:]):
        if lo == hi:
            raise ValueError(f"levels has the duplicate value {lo}: {list(values)}")
        if lo > hi:
            raise ValueError(f"levels must be sorted increasingly, got {list(values)} ({lo} before {hi})")


def resolve_levels(levels: str | Sequence[float] | torch.Tensor | LevelSet) -> torch.Tensor:
    """``LevelSet(levels).tensor()``: the level set as a sorted 1-D float32 CPU tensor."""
    return LevelSet(levels).tensor()
