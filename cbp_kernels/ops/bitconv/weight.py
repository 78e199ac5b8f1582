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

A weight on any other level set Q (sorted) is stored as its codes k (``w = scale * Q[k]``,
``LevelSet.encode``) in the same plane layout: ``pack_codes`` makes ceil(log2 |Q|) planes,
plane b holding bit b of each code.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..bitpack import reference as bits
from ..levels import LevelSet
from ..utils import check_finite

__all__ = ["PackedWeight", "pack_weight", "unpack_weight", "weight_levels", "infer_levels", "pack_codes", "unpack_codes"]


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


def pack_weight(w_q: torch.Tensor, levels: str | LevelSet, scale: float) -> PackedWeight:
    """Packs ``w_q = scale * q`` (q on ``levels``) into bit planes.

    Args:
        w_q: float weight ``[O, Cg, KH, KW]`` or ``[O, C]`` whose every value is exactly
            ``scale * level`` in float32 (any float dtype; compared in float32).
        levels: ``"binary"`` ({-1, 1}) or ``"ternary"`` ({-1, 0, 1}), by name or as a ``LevelSet``.
        scale: the per-layer scale, > 0 (used as a float32 value).

    Raises:
        ValueError: when a value of ``w_q`` is not ``scale * level`` (names the first one).
    """
    if not isinstance(w_q, torch.Tensor) or not w_q.is_floating_point():
        raise TypeError(f"w_q must be a floating-point torch.Tensor, got {getattr(w_q, 'dtype', type(w_q))}")
    if w_q.dim() not in (2, 4):
        raise ValueError(f"w_q must be [O, C] (linear) or [O, Cg, KH, KW] (conv), got shape {tuple(w_q.shape)}")
    levels = LevelSet(levels)
    if not levels.popcount:
        raise ValueError(f"levels must be binary {{-1, 1}} or ternary {{-1, 0, 1}} to pack into popcount planes, "
                         f"got {list(levels.values)}")
    scale = check_finite("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    scale = _float32(scale)
    codes = levels.encode(w_q, scale, "w_q")
    # binary: the code (0: -1, 1: +1) is the sign bit; ternary (codes 0, 1, 2): masks of +1 and of -1
    masks = [codes == 1] if levels.name == "binary" else [codes == 2, codes == 0]
    return PackedWeight(torch.stack([_pack_channels(m) for m in masks]), scale, tuple(w_q.shape), levels.name)


def _pack_channels(mask: torch.Tensor) -> torch.Tensor:
    """{0,1} ``[O, Cg, KH, KW]`` or ``[O, C]`` -> int32 ``[O, KH, KW, Wg]`` packed along Cg."""
    m4 = mask if mask.dim() == 4 else mask[:, :, None, None]
    rows = m4.permute(0, 2, 3, 1)  # [O, KH, KW, Cg]: pack along the input channels
    return bits.pack_rows(rows.reshape(-1, rows.shape[-1])).reshape(*rows.shape[:-1], -1)


def pack_codes(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Integer codes ``[O, Cg, KH, KW]`` / ``[O, C]`` in [0, 2**n_bits) -> int32 bit planes
    ``[n_bits, O, KH, KW, Wg]`` (plane b holds bit b of each code; the layout of the popcount
    planes: packed along the input channels, LSB first). The storage of a weight on a level
    set that the popcount kernels do not run (``cbp_kernels.export``)."""
    c = codes.long()
    return torch.stack([_pack_channels((c >> b) & 1) for b in range(n_bits)])


def unpack_codes(planes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The int64 codes of ``shape`` held by ``pack_codes``'s ``planes`` (exact inverse)."""
    bit_planes = weight_bits(planes, shape[1], torch.int64)  # [n_bits, O, Cg, KH, KW]
    weights = torch.tensor([1 << b for b in range(planes.shape[0])], device=planes.device).view(-1, 1, 1, 1, 1)
    return (bit_planes * weights).sum(0).reshape(shape)


def weight_bits(planes: torch.Tensor, in_per_group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bits ``[P, O, in_per_group, KH, KW]`` (0 / 1 of ``dtype``) of each plane."""
    P, O, KH, KW, Wg = planes.shape
    unpacked = bits.unpack(planes.reshape(-1, Wg), in_per_group, dtype).reshape(P, O, KH, KW, in_per_group)
    return unpacked.permute(0, 1, 4, 2, 3)


def weight_levels(planes: torch.Tensor, in_per_group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer levels q ``[O, in_per_group, KH, KW]`` (of ``dtype``) held by ``planes``."""
    b = weight_bits(planes, in_per_group, dtype)
    return 2 * b[0] - 1 if planes.shape[0] == 1 else b[0] - b[1]


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
