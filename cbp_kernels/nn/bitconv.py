"""Bit-packed binary / ternary layers for inference on spikes: ``PackedConv2d`` and
``PackedLinear``.

Built from a quantized float layer with ``.from_float(layer)``, they hold only the packed
weight bit planes (1 bit per binary weight, 2 per ternary one), the scale and the bias, so
a binary layer's weights take 1/32 of their float32 memory. Their forward takes {0,1}
spikes and returns the float layer's output, computed by popcount (``packed_conv2d``):
bit for bit ``float32(conv(spikes, q)) * scale + bias`` with the exact integer count
(equal to the float layer's output up to the rounding order of its sums; bit for bit for
a power-of-two scale without bias). Inference only: no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.bitconv import PackedWeight, infer_levels, pack_spikes, pack_weight, packed_conv2d, packed_linear
from ..ops.bitpack import bitpack
from ..ops.levels import LevelSet

__all__ = ["PackedConv2d", "PackedLinear"]


def _quantized(layer: nn.Module, levels: str | None) -> tuple[torch.Tensor, str, float]:
    """(w_q, levels, scale) of a float layer whose weight lies on scale * levels, or of a
    quantized layer with ``levels`` / ``weight_scale`` buffers (e.g. ``QuantConv2d``)."""
    with torch.no_grad():
        if hasattr(layer, "levels") and hasattr(layer, "weight_scale"):
            own = LevelSet(layer.levels)
            if not own.popcount:
                raise ValueError(f"layer.levels must be [-1, 1] or [-1, 0, 1] to pack, got {list(own.values)}")
            w_q = layer.quantized_weight() if hasattr(layer, "quantized_weight") else layer.weight
            return w_q.detach(), levels or own.name, float(layer.weight_scale)
        found, scale = infer_levels(layer.weight)
        if levels == "ternary" and found == "binary":
            found = "ternary"  # a binary weight is a ternary one without zeros
        if levels is not None and levels != found:
            raise ValueError(f"layer.weight is {found}, not {levels}")
        return layer.weight.detach(), found, scale


class _Packed(nn.Module):
    """Buffers shared by the packed layers: ``planes`` (int32 bit planes), ``weight_scale``
    (0-dim float32) and ``bias`` (float32 or None)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, backend: str):
        super().__init__()
        self.register_buffer("planes", weight.planes)
        self.register_buffer("weight_scale", torch.tensor(weight.scale, dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.weight_shape = tuple(weight.shape)
        self.levels = weight.levels
        self.backend = backend

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self.planes, float(self.weight_scale), self.weight_shape, self.levels)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (planes + scale) and the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * 4
        return self.weight.nbytes + bias


class PackedConv2d(_Packed):
    """Popcount convolution of {0,1} spikes with a packed binary / ternary weight.

    Input ``[N, C, H, W]`` or ``[T, N, C, H, W]`` {0,1} spikes (any float / bool / uint8
    dtype) -> float32 ``[N, O, OH, OW]`` / ``[T, N, O, OH, OW]`` (channels-last memory).
    ``forward_packed`` takes spikes already packed (``pack_spikes``, NHWC) and returns NHWC.
    """

    def __init__(self, weight: PackedWeight, bias=None, stride=1, padding=0, dilation=1, groups=1, backend="auto"):
        super().__init__(weight, bias, backend)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_float(cls, layer: nn.Conv2d, levels: str | None = None, backend: str = "auto") -> "PackedConv2d":
        """Packs ``layer`` (an ``nn.Conv2d`` whose weight lies exactly on scale * levels, or a
        quantized conv with ``levels`` / ``weight_scale`` buffers). ``levels``: ``"binary"`` /
        ``"ternary"``, detected when None."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"only zero padding given as ints is supported, got padding={layer.padding!r}, mode={layer.padding_mode!r}")
        w_q, levels, scale = _quantized(layer, levels)
        return cls(pack_weight(w_q, levels, scale), layer.bias, tuple(layer.stride), tuple(layer.padding),
                   tuple(layer.dilation), layer.groups, backend)

    def forward_packed(self, spikes_packed: torch.Tensor) -> torch.Tensor:
        """int32 ``[N, H, W, words]`` (or ``[T, N, H, W, words]``) -> float32 NHWC output."""
        lead = spikes_packed.shape[:-3]
        x = spikes_packed.reshape(-1, *spikes_packed.shape[-3:])
        out = packed_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                            backend=self.backend)
        return out.reshape(*lead, *out.shape[1:])

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        if spikes.dim() not in (4, 5):
            raise ValueError(f"spikes must be [N, C, H, W] or [T, N, C, H, W], got shape {tuple(spikes.shape)}")
        out = self.forward_packed(pack_spikes(spikes.movedim(-3, -1), self.groups, backend=self.backend))
        return out.movedim(-1, -3)

    def extra_repr(self) -> str:
        return (f"{self.weight_shape[1] * self.groups}, {self.weight_shape[0]}, kernel_size={self.weight_shape[2:]}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"levels={self.levels}, bias={self.bias is not None}")


class PackedLinear(_Packed):
    """Popcount linear layer: {0,1} ``[*, C]`` -> float32 ``[*, O]``; ``forward_packed``
    takes ``bitpack(x, -1)``."""

    @classmethod
    def from_float(cls, layer: nn.Linear, levels: str | None = None, backend: str = "auto") -> "PackedLinear":
        """Packs ``layer`` (see ``PackedConv2d.from_float``)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        w_q, levels, scale = _quantized(layer, levels)
        return cls(pack_weight(w_q, levels, scale), layer.bias, backend)

    def forward_packed(self, x_packed: torch.Tensor) -> torch.Tensor:
        return packed_linear(x_packed, self.weight, self.bias, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_packed(bitpack(x, -1, backend=self.backend))

    def extra_repr(self) -> str:
        return f"in_features={self.weight_shape[1]}, out_features={self.weight_shape[0]}, levels={self.levels}, bias={self.bias is not None}"
