"""Bit-packed convolution in plain PyTorch: the specification every kernel is tested against.

Unpacks the spikes and the weight levels, convolves in float64 with ``F.conv2d`` (every
partial sum is an integer below 2^53, so the count c is exact whatever the summation
order), then applies the one float32 epilogue every backend shares:
``out = float32(c) * scale (+ bias)`` (csrc/common/bitconv_math.h).

Why not ``F.conv2d(spikes, scale * q)`` directly: its partial sums are multiples of the
scale, rounded at every step in an order the library chooses, so for a general scale it
differs from ``scale * c`` in the last bits. It equals this result bit for bit whenever
every ``scale * partial sum`` is exact in float32, e.g. a power-of-two scale with
|c| * 2^(mantissa bits of the scale) < 2^24 (the tests check both).

Shapes: x int32 [N, H, W, G*Wg], planes int32 [P, O, KH, KW, Wg] -> float32 [N, OH, OW, O].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bitpack import reference as bits
from .weight import weight_levels


def output_size(H: int, W: int, KH: int, KW: int, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of a convolution (PyTorch's rule)."""
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return OH, OW


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    N, H, W, Cw = x.shape
    Wg = planes.shape[-1]
    cin = Wg * bits.WORD_BITS  # every bit of the words: the zero tail bits add nothing
    spikes = bits.unpack(x.reshape(-1, Wg), cin, torch.float64).reshape(N, H, W, groups * cin).permute(0, 3, 1, 2)
    q = weight_levels(planes, cin, torch.float64)
    count = F.conv2d(spikes, q, None, stride, padding, dilation, groups)
    out = count.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=x.device)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.permute(0, 2, 3, 1).contiguous()
