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
``conv2d_lif`` is the fused epilogue (affine + neuron + packing of the output spikes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..bitpack import reference as bits
from ..neuron import reference as neuron
from ..neuron.params import NeuronParams
from .weight import weight_levels


def output_size(H: int, W: int, KH: int, KW: int, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of a convolution (PyTorch's rule)."""
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return OH, OW


class Geometry(NamedTuple):
    """The sizes of one packed convolution: cbp::BitConvGeometry's fields, in its order."""

    N: int
    H: int
    W: int
    OH: int
    OW: int
    KH: int
    KW: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    groups: int
    words_per_group: int
    out_per_group: int
    planes: int

    @classmethod
    def of(cls, x, planes, stride, padding, dilation, groups: int) -> "Geometry":
        N, H, W, _ = x.shape
        P, O, KH, KW, Wg = planes.shape
        OH, OW = output_size(H, W, KH, KW, stride, padding, dilation)
        return cls(N, H, W, OH, OW, KH, KW, *stride, *padding, *dilation, groups, Wg, O // groups, P)

    def empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """The uninitialised float32 NHWC output [N, OH, OW, O] on x's device."""
        return torch.empty(self.N, self.OH, self.OW, self.groups * self.out_per_group, dtype=torch.float32, device=x.device)

    def empty_lif_outputs(self, x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The uninitialised outputs of ``conv2d_lif`` on x's device: spike words int32
        [N, OH, OW, ceil(O/32)] and v_last float32 [N/T, OH, OW, O]."""
        O = self.groups * self.out_per_group
        words = torch.empty(self.N, self.OH, self.OW, -(-O // bits.WORD_BITS), dtype=torch.int32, device=x.device)
        return words, torch.empty(self.N // T, self.OH, self.OW, O, dtype=torch.float32, device=x.device)


def count(x, planes, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The exact integer count c as float32 NHWC [N, OH, OW, O]."""
    N, H, W, Cw = x.shape
    Wg = planes.shape[-1]
    cin = Wg * bits.WORD_BITS  # every bit of the words: the zero tail bits add nothing
    spikes = bits.unpack(x.reshape(-1, Wg), cin, torch.float64).reshape(N, H, W, groups * cin).permute(0, 3, 1, 2)
    q = weight_levels(planes, cin, torch.float64)
    return F.conv2d(spikes, q, None, stride, padding, dilation, groups).to(torch.float32).permute(0, 2, 3, 1)


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    out = count(x, planes, stride, padding, dilation, groups) * torch.tensor(scale, dtype=torch.float32, device=x.device)
    if bias is not None:
        out = out + bias
    return out.contiguous()


def conv2d_lif(x, planes, mul, add, stride, padding, dilation, groups: int, T: int, decay: float, p: NeuronParams):
    """The fused epilogue: y = float32(c) * mul + add, the neuron over T (x's batch is T*N,
    t major; the neuron's reference), the spikes packed along the channels.
    Returns (int32 [T*N, OH, OW, ceil(O/32)], v_last float32 [N, OH, OW, O])."""
    y = count(x, planes, stride, padding, dilation, groups) * mul + add
    y_seq = y.unflatten(0, (T, -1))
    v_init = torch.full(y_seq.shape[1:], p.reset_value, dtype=torch.float32, device=x.device)
    spikes, v_last, _ = neuron.forward(y_seq, v_init, torch.tensor(decay, dtype=torch.float32, device=x.device), p)
    words = bits.pack_rows(spikes.reshape(-1, y.shape[-1])).reshape(*y.shape[:-1], -1)
    return words, v_last
