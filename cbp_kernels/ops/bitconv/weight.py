"""The packed weight format of binary and ternary layers, and its checked conversions.

A quantized weight is ``w_q = scale * q`` with integer levels q in {-1, 1} (binary) or
{-1, 0, 1} (ternary) and a per-layer scale > 0. Packed, it is:
- ``planes``: int32 ``[P, O, KH, KW, Wg]`` bit planes packed along the input channels of
  a group (Cg = shape[1], Wg = ceil(Cg/32) words, LSB first, bits past Cg are 0).
  binary (P = 1): bit 1 is +1, bit 0 is -1 (sign bits); ternary (P = 2): plane 0 is the
  mask of +1, plane 1 the mask of -1;
- ``scale`` (a float32 value), ``shape`` (the float weight's shape: ``(O, Cg, KH, KW)``
  for a convolution, ``(O, C)`` for a linear layer) and ``levels`` (``"binary"`` /
  ``"ternary"``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..bitpack import reference as bits
from ..utils import check_finite

__all__ = ["LEVELS", "PackedWeight", "pack_weight", "unpack_weight", "weight_levels", "infer_levels"]

LEVELS = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0)}
_PLANES = {"binary": 1, "ternary": 2}


class PackedWeight(NamedTuple):
    """A packed binary / ternary weight (see the module docstring for the format)."""

    planes: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    levels: str

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_per_group(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed planes plus the float32 scale."""
        return self.planes.numel() * self.planes.element_size() + 4


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def pack_weight(w_q: torch.Tensor, levels: str, scale: float) -> PackedWeight:
    """Packs ``w_q = scale * q`` (q on ``levels``) into bit planes.

    Args:
        w_q: float weight ``[O, Cg, KH, KW]`` or ``[O, C]`` whose every value is exactly
            ``scale * level`` in float32 (any float dtype; compared in float32).
        levels: ``"binary"`` ({-1, 1}) or ``"ternary"`` ({-1, 0, 1}).
        scale: the per-layer scale, > 0 (used as a float32 value).

    Raises:
        ValueError: when a value of ``w_q`` is not ``scale * level`` (names the first one).
    """
    if not isinstance(w_q, torch.Tensor) or not w_q.is_floating_point():
        raise TypeError(f"w_q must be a floating-point torch.Tensor, got {getattr(w_q, 'dtype', type(w_q))}")
    if w_q.dim() not in (2, 4):
        raise ValueError(f"w_q must be [O, C] (linear) or [O, Cg, KH, KW] (conv), got shape {tuple(w_q.shape)}")
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {sorted(LEVELS)}, got {levels!r}")
    scale = check_finite("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    scale = _float32(scale)
    w = w_q.detach().to(torch.float32)
    q = torch.round(w / scale)
    allowed = torch.tensor(LEVELS[levels], device=w.device)
    bad = ~torch.isin(q, allowed) | (q * scale != w)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"w_q is not on scale * {levels} levels {LEVELS[levels]} with scale={scale}: "
            f"w_q{list(idx)} = {w[idx].item()}"
        )
    shape = tuple(w.shape)
    q4 = q if q.dim() == 4 else q[:, :, None, None]
    q_nhwc = q4.permute(0, 2, 3, 1)  # [O, KH, KW, Cg]: pack along the input channels
    masks = [q_nhwc > 0] if levels == "binary" else [q_nhwc > 0, q_nhwc < 0]
    planes = torch.stack([_pack_last(m) for m in masks])
    return PackedWeight(planes, scale, shape, levels)


def _pack_last(mask: torch.Tensor) -> torch.Tensor:
    rows = mask.reshape(-1, mask.shape[-1])
    return bits.pack_rows(rows).reshape(*mask.shape[:-1], -1)


def weight_levels(planes: torch.Tensor, in_per_group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer levels q ``[O, in_per_group, KH, KW]`` (of ``dtype``) held by ``planes``."""
    P, O, KH, KW, Wg = planes.shape
    unpacked = bits.unpack(planes.reshape(-1, Wg), in_per_group, dtype).reshape(P, O, KH, KW, in_per_group)
    q = 2 * unpacked[0] - 1 if P == 1 else unpacked[0] - unpacked[1]
    return q.permute(0, 3, 1, 2)


def unpack_weight(packed: PackedWeight) -> torch.Tensor:
    """The float32 weight ``scale * q`` of ``packed``, in its original shape (exact inverse)."""
    q = weight_levels(packed.planes, packed.in_per_group)
    return (q * packed.scale).reshape(packed.shape)


def infer_levels(w_q: torch.Tensor) -> tuple[str, float]:
    """``(levels, scale)`` of a weight whose values are ``{-s, s}`` (binary) or a subset of
    ``{-s, 0, s}`` with a 0 (ternary); raises ValueError for any other weight."""
    values = torch.unique(w_q.detach().to(torch.float32))
    magnitudes = torch.unique(values.abs())
    nonzero = magnitudes[magnitudes != 0]
    if nonzero.numel() != 1:
        raise ValueError(
            "weight is not binary or ternary: its nonzero magnitudes are "
            f"{nonzero[:8].tolist()}{'...' if nonzero.numel() > 8 else ''} (expected one value s)"
        )
    levels = "ternary" if bool((values == 0).any()) else "binary"
    return levels, float(nonzero[0])
