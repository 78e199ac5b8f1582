"""The exact integer forward of the quantized layers in training.

A quantized layer computes with Q(W) = s * q (q in {-1, 1} or {-1, 0, 1}, s the per-layer
scale). When its input x holds small non-negative integers (spikes {0, 1}; SEW ADD sums
0..k), every sum of its convolution is an integer, computed exactly by the popcount
convolution (``ops.packed_conv2d``: AMX-INT8 / AVX-512 on a CPU, ``mma.sync`` b1 on CUDA)
on the bit planes of x:

    c = conv(x, q) = sum_b 2^b * conv(x_b, q),   x_b = bit b of x,   b < bit_length(k)
    y = float32(c) * s (+ bias)

bit for bit ``F.conv2d(x.double(), q.double()).float() * s (+ bias)``, where the float
forward ``F.conv2d(x, s * q)`` rounds its partial sums in the library's order. The planes go
through ONE packed convolution (stacked along the batch), at scale 1 so that its outputs are
the counts; the scale and bias are applied once after their sum, as the packed op's own
epilogue does. The weight is re-packed on every call (it trains): a clamp per plane and one
``bitpack`` launch over the weight. Nothing here reads a value back to the host (no device
sync): which layers take this path is declared by the model (``input_max``), not checked.

Which layers take it: ``integer_forward`` on the layer (``CBPConfig(integer_forward=...)``):
True (the default) runs it where it is the faster forward, a rule on the weight's shape and
the declared input range (``prefers_integer``, ``MIN_PRODUCTS_PER_PLANE``); ``"always"`` on
every layer it applies to; False never.

The backward computes the float layer's gradients (``SpikeConv2dFunction`` in ``lifconv.py``;
for a linear layer the matrix products of ``F.linear``'s autograd): the input gradient with
Q(W), the weight gradient straight through ``ops.quantize`` to W, the bias gradient. On the CPU
a convolution's runs on AMX-BF16 (``lifconv._tile_backward``: dy split exactly into three
bfloat16 parts times the exact q and x, float32 sums: ``ops.conv_input_grad``,
``ops.conv_weight_grad``), elsewhere ``aten.convolution_backward`` with the float Q(W).
``integer_forward=False`` keeps both the float forward and ATen's backward (the authors'
rounding, for the lock-step comparison).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops._backend import resolve_backend
from ..ops.bitconv.op import run as packed_conv_run
from ..ops.bitconv.weight import PackedWeight
from ..ops.bitpack import pack_bits
from ..ops.levels import LevelSet
from ..ops.plane_sum import plane_sum_nchw

__all__ = ["IntegerForward", "MAX_INPUT", "MIN_PRODUCTS_PER_PLANE", "check_input_max", "check_integer_forward",
           "integer_spec", "integer_conv2d", "integer_linear", "IntegerLinearFunction", "popcount_name",
           "prefers_integer", "takes_integer_forward"]

#: The largest declared input value: the input's bit planes are taken from its uint8 copy.
MAX_INPUT = 255


#: ``integer_forward=True`` runs a convolution's integer forward when each of its outputs sums
#: at least this many products per input bit plane, (in_channels / groups) * kernel area /
#: bit_length(input_max); the float forward otherwise, and for linear layers. Measured as the
#: float forward's time over the integer one's, one and two threads, interleaved (2026-12-06):
#: SEW-ResNet-18 (224 px, T = 4) batch 1 and 8: every 3x3 layer 1.03-7.6x (288-4608 per
#: plane), its 1x1 stride-2 downsamples 0.26-0.68x (64-128 per plane: three planes of a large
#: map packed for a light conv); other convs at batch 1: 128-256 per plane 0.59-1.06x
#: (3x3 and 1x1), 288-1152 per plane 1.09-2.3x; linear layers 0.18-1.13x (the weight is
#: packed on every call, which the few rows of a classifier do not repay).
MIN_PRODUCTS_PER_PLANE = 288


def check_integer_forward(value, name: str = "integer_forward"):
    """``value`` if it is True, False or ``"always"``; else one ValueError line."""
    if value is not True and value is not False and value != "always":
        raise ValueError(f"{name} must be True (where it is faster), 'always' or False, got {value!r}")
    return value


def prefers_integer(weight_shape, input_max: int) -> bool:
    """Whether ``integer_forward=True`` runs the integer forward of a layer whose weight has
    ``weight_shape`` (``[O, C/groups, KH, KW]``; 2-D: a linear layer) and whose input holds
    integers in [0, ``input_max``]: a decision from shapes alone (``MIN_PRODUCTS_PER_PLANE``)."""
    if len(weight_shape) != 4:
        return False
    products = weight_shape[1] * weight_shape[2] * weight_shape[3]
    return products >= MIN_PRODUCTS_PER_PLANE * int(input_max).bit_length()


def takes_integer_forward(layer) -> bool:
    """Whether ``layer`` (a quantized conv / linear, ``LIFConv2d``) runs its integer forward in
    float32 training: switched on, a declared input_max, binary / ternary levels and, unless
    ``"always"``, ``prefers_integer``."""
    mode, k = getattr(layer, "integer_forward", False), getattr(layer, "input_max", None)
    if not mode or k is None or getattr(layer, "popcount_levels", None) is None:
        return False
    return mode == "always" or prefers_integer(tuple(layer.weight.shape), k)


class IntegerForward(NamedTuple):
    """How a layer runs its integer forward: its input holds integers in [0, ``input_max``],
    its weight is ``scale * q`` with q on ``levels`` (``"binary"`` / ``"ternary"``);
    ``scale`` a 0-dim float32 tensor on the input's device; ``backend`` of the packed ops."""

    input_max: int
    levels: str
    scale: torch.Tensor
    backend: str

    @property
    def planes(self) -> int:
        """Bit planes of the input: bit_length(input_max)."""
        return self.input_max.bit_length()


def check_input_max(value, name: str = "input_max") -> int | None:
    """``value`` if it is None or an int in [1, ``MAX_INPUT``]; else one ValueError line."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INPUT):
        raise ValueError(f"{name} must be None (real-valued input) or an int in [1, {MAX_INPUT}] (the largest "
                         f"integer of the input), got {value!r}")
    return value


def popcount_name(levels) -> str | None:
    """``"binary"`` / ``"ternary"`` for those level sets (the ones the popcount convolution
    runs), else None; read once when a layer's levels are set (``popcount_levels``)."""
    level_set = LevelSet(levels)
    return level_set.name if level_set.popcount else None


def integer_spec(layer, x: torch.Tensor, weight: torch.Tensor, scale, dims: int) -> IntegerForward | None:
    """The integer forward of ``layer`` on ``x``, or None where it keeps the float path.

    It runs when ``takes_integer_forward(layer)`` (the switch, the model's ``input_max``:
    the layer reads integers 0..input_max, spikes or SEW ADD sums; binary / ternary levels,
    ``popcount_levels``, cached when the levels were set; with ``integer_forward=True`` the
    shape rule ``prefers_integer``), x and the weight are float32 with ``dims`` dimensions,
    and neither autocast nor torch.compile is active (both keep the float forward). Decided
    from attributes, dtypes and shapes only."""
    if torch.compiler.is_compiling() or not takes_integer_forward(layer):
        return None
    k, levels = layer.input_max, layer.popcount_levels
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != dims:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    backend = resolve_backend(getattr(layer, "quant_backend", "auto"), "bitconv2d", x.device, "cbp_kernels.ops.bitconv")
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(device=x.device, dtype=torch.float32).reshape(())
    else:  # a number: filled on the device (a host tensor copied there would wait for its stream)
        scale = torch.full((), float(scale), dtype=torch.float32, device=x.device)
    return IntegerForward(k, levels, scale, backend)


def _weight_planes(wq: torch.Tensor, levels: str, backend: str) -> torch.Tensor:
    """Q(W) = s * q ``[O, Cg, KH, KW]`` (s > 0) -> the popcount planes ``[P, O, KH, KW, Wg]``
    (``ops.bitconv.weight``'s format: binary, the sign bits; ternary, the masks of +1 and -1).
    Each plane is a float32 tensor nonzero where its bit is set (max(Q, 0), min(Q, 0)),
    packed along Cg as it lies: a strided read on the bitpack kernel's float32 vector path
    (bool masks take its scalar loop: 3x slower on SEW-ResNet's 256x256x3x3)."""
    P = 1 if levels == "binary" else 2
    planes = torch.empty((P, *wq.shape), dtype=wq.dtype, device=wq.device)
    torch.clamp(wq, min=0, out=planes[0])
    if P == 2:
        torch.clamp(wq, max=0, out=planes[1])
    return pack_bits(planes.flatten(0, 1).permute(0, 2, 3, 1), backend).unflatten(0, (P, -1))


def _input_planes(x: torch.Tensor, spec: IntegerForward, groups: int) -> torch.Tensor:
    """x ``[N, C, H, W]`` (integers in [0, input_max]) -> int32 ``[P*N, H, W, groups*Wg]``:
    plane b (bit b of x) in rows b*N..(b+1)*N, each group's channels packed on their own.
    The planes are float32 NCHW, the bitpack kernel's vector path (16 pixels per channel),
    taken from the top bit down with the rest r (r = x first, r < 2^(b+1) at plane b): plane
    b = (r >= 2^b), r -= 2^b * plane b; plane 0 = the last rest (exact: small integers,
    power-of-two scaling). One compare instead of a multiply and a floor: the 7 two-plane
    inputs of SEW-ResNet-18's batch-1 step (its ADD sums), planes and packing, A/B in one
    process, min of 21, under load: 6.19 -> 5.56 ms on one thread, 3.49 -> 3.31 on two."""
    x = x.detach()
    if spec.planes > 1:
        bits = torch.empty((spec.planes, *x.shape), dtype=x.dtype, device=x.device)
        rest = x
        for b in range(spec.planes - 1, 0, -1):
            torch.ge(rest, float(1 << b), out=bits[b])
            rest = torch.add(rest, bits[b], alpha=-float(1 << b), out=bits[0])
        x = bits.flatten(0, 1)
    nhwc = x.permute(0, 2, 3, 1)
    words = pack_bits(nhwc.unflatten(-1, (groups, x.shape[1] // groups)), spec.backend)
    return words.flatten(-2)


def integer_conv2d(x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int, spec: IntegerForward) -> torch.Tensor:
    """``float32(conv2d(x, q)) * s (+ bias)``, the count exact (see the module docstring).

    x: float32 ``[N, C, H, W]`` holding integers in [0, spec.input_max]; wq: float32 Q(W) =
    s * q ``[O, C/groups, KH, KW]``; bias: float32 ``[O]`` or None; stride, padding,
    dilation: pairs of ints. Returns float32 ``[N, O, OH, OW]`` (contiguous NCHW, as
    ``F.conv2d``). No autograd (``SpikeConv2dFunction`` wraps it)."""
    P = spec.planes
    planes = _weight_planes(wq.detach(), spec.levels, spec.backend)
    weight = PackedWeight(planes, 1.0, tuple(wq.shape), spec.levels)
    counts = packed_conv_run(_input_planes(x, spec, groups), weight, None, list(stride), list(padding),
                             list(dilation), groups, spec.backend)  # [P*N, OH, OW, O]: the plane counts, exact
    # float32(sum_b 2^b * counts_b) * s, written NCHW: one pass of the CPU kernel (ops.plane_sum), the
    # torch code (its reference) elsewhere. A/B in one process, interleaved, min of 15, under load
    # (2026-12-07), torch code -> kernel, one thread: [32, 56, 56, 64] 7.56 -> 3.55 ms (clone 3.10),
    # [32, 28, 28, 128] 3.50 -> 1.21, [32, 14, 14, 256] 1.67 -> 0.69, [32, 7, 7, 512] 0.72 -> 0.47,
    # two planes at [32, 56, 56, 64] 13.7 -> 7.5; two threads (the other core busy) 1.55x, 2.54x,
    # 1.42x, 0.98x, 2.44x. Inside SEW-ResNet-18's CBP step at batch 8 (16 epilogues, both run per
    # call, alternating): 100-141 -> 63-93 ms at one thread, 53-229 -> 37-145 ms at two, 1.1-1.9%
    # of the step (1.3-1.6% at two threads).
    out = plane_sum_nchw(counts, P, spec.scale, "cpu" if spec.backend == "cpu" else "reference")
    if bias is not None:
        out += bias.view(-1, 1, 1)
    return out


def integer_linear(x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, spec: IntegerForward) -> torch.Tensor:
    """``float32(x @ q.T) * s (+ bias)`` for x ``[*, C]`` -> ``[*, O]``: ``integer_conv2d`` on 1x1 pixels."""
    C, O = x.shape[-1], wq.shape[0]
    y = integer_conv2d(x.reshape(-1, C, 1, 1), wq.view(O, C, 1, 1), bias, (1, 1), (0, 0), (1, 1), 1, spec)
    return y.view(*x.shape[:-1], O)


class IntegerLinearFunction(torch.autograd.Function):
    """y = ``integer_linear(x, wq, bias, spec)``; the backward is ``F.linear``'s autograd on
    2-D rows (addmm's): dx = dy @ Q(W), dW = (x^T @ dy)^T, db = sum of dy over the rows."""

    @staticmethod
    def forward(ctx, x, wq, bias, spec):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, wq if ctx.needs_input_grad[0] else None)
        ctx.x_shape = x.shape
        return integer_linear(x, wq, bias, spec)

    @staticmethod
    def backward(ctx, grad_y):
        x, wq = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        gx = g.mm(wq).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = x.reshape(-1, x.shape[-1]).t().mm(g).t() if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None
