"""The public bit-packed convolution / linear ops: validation, backend choice and the
torch.library custom op (with a fake implementation for torch.compile). Inference ops:
no gradient flows through them.

Layout: spikes NHWC packed along C (``bitpack(x_nhwc, -1)``), time folded into the batch
([T*N, H, W, Cw]); output float32 NHWC [N, OH, OW, O]. For ``groups > 1`` each group's
channels are packed on their own: ``bitpack(x.unflatten(-1, (groups, C // groups)), -1)
.flatten(-2)`` (the same as packing C at once when C / groups is a multiple of 32);
``pack_spikes`` does it.
"""
from __future__ import annotations

import importlib

import torch

from ..._backend import resolve_backend
from ..bitpack import WORD_BITS, packed_size
from ..bitpack.op import pack_along
from ..utils import check_same_device
from . import reference
from .weight import PackedWeight

__all__ = ["packed_conv2d", "packed_linear", "pack_spikes"]

_BACKEND_MODULES = {"reference": "reference", "cpu": "compiled", "cuda": "compiled", "cupy": "cupy", "triton": "triton"}


def _impl(backend: str):
    return importlib.import_module(f"{__package__}.{_BACKEND_MODULES[backend]}")


@torch.library.custom_op("cbp_kernels::bitconv2d", mutates_args=())
def _bitconv2d(
    x: torch.Tensor, planes: torch.Tensor, scale: float, bias: torch.Tensor | None, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, backend: str,
) -> torch.Tensor:
    return _impl(backend).conv2d(x, planes, scale, bias, stride, padding, dilation, groups)


@_bitconv2d.register_fake
def _(x, planes, scale, bias, stride, padding, dilation, groups, backend):
    OH, OW = reference.output_size(x.shape[1], x.shape[2], planes.shape[2], planes.shape[3], stride, padding, dilation)
    return x.new_empty(x.shape[0], OH, OW, planes.shape[1], dtype=torch.float32)


def _pair(name: str, value, minimum: int) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def pack_spikes(spikes: torch.Tensor, groups: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """NHWC {0,1} spikes ``[..., C]`` -> int32 words ``[..., groups * ceil(C/groups/32)]``,
    each group's channels packed on their own (the input format of ``packed_conv2d``)."""
    C = spikes.shape[-1]
    if C % groups:
        raise ValueError(f"the channel count {C} is not divisible by groups={groups}")
    return pack_along(spikes.unflatten(-1, (groups, C // groups)), -1, backend=backend, name="spikes").flatten(-2)


def _check_weight(weight_packed) -> PackedWeight:
    if not isinstance(weight_packed, PackedWeight):
        raise TypeError(f"weight_packed must be a PackedWeight (from pack_weight), got {type(weight_packed).__name__}")
    return weight_packed


def _check_tail_bits_zero(x: torch.Tensor, cin: int, groups: int) -> None:
    """Bits past the group's channel count must be 0 (bitpack writes them so)."""
    if cin % WORD_BITS == 0 or torch.compiler.is_compiling():
        return
    last = x.view(*x.shape[:-1], groups, -1)[..., -1]
    tail = torch.tensor(-(1 << (cin % WORD_BITS)), dtype=torch.int32, device=x.device)  # bits >= cin % 32
    if bool((last & tail).any()):
        raise ValueError(
            f"spikes_packed has bits set past the {cin} input channels of a group: pack the spikes "
            "with bitpack / pack_spikes (groups packed on their own)"
        )


def packed_conv2d(
    spikes_packed: torch.Tensor,
    weight_packed: PackedWeight,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Convolution of packed {0,1} spikes with a packed binary / ternary weight, by popcount.

    ``out = float32(c) * scale (+ bias)`` with the exact integer count
    ``c = conv2d(spikes, q)`` (q the integer levels): bit for bit
    ``F.conv2d(spikes, q.double()).float() * scale + bias`` (see ``reference``), and equal to
    ``F.conv2d(spikes, scale * q, bias)`` up to the float rounding of its partial sums
    (bit for bit for a power-of-two scale without bias).

    Args:
        spikes_packed: int32 ``[N, H, W, groups * Wg]`` NHWC spikes packed along C
            (``pack_spikes``), time folded into N.
        weight_packed: ``pack_weight(w_q, levels, scale)`` of a ``[O, C/groups, KH, KW]`` weight.
        bias: float32 ``[O]`` or None.
        stride, padding, dilation: int or pair, as ``F.conv2d`` (padding is zero spikes).
        groups: as ``F.conv2d``.
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        float32 ``[N, OH, OW, O]`` (NHWC).
    """
    w = _check_weight(weight_packed)
    if len(w.shape) != 4:
        raise ValueError(f"weight_packed must hold a conv weight [O, Cg, KH, KW], got shape {w.shape}")
    if not isinstance(spikes_packed, torch.Tensor) or spikes_packed.dtype != torch.int32:
        raise TypeError(
            f"spikes_packed must be an int32 torch.Tensor of packed spikes (bitpack), got {getattr(spikes_packed, 'dtype', type(spikes_packed))}"
        )
    if spikes_packed.dim() != 4:
        raise ValueError(f"spikes_packed must be [N, H, W, words] (NHWC, time folded into N), got shape {tuple(spikes_packed.shape)}")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1 or w.out_features % groups:
        raise ValueError(f"groups must be an int >= 1 dividing the {w.out_features} output channels, got {groups!r}")
    O, cin, KH, KW = w.shape
    words = groups * packed_size(cin)
    if spikes_packed.shape[-1] != words:
        raise ValueError(
            f"spikes_packed has {spikes_packed.shape[-1]} words per pixel but the weight needs {words} "
            f"({groups} group(s) of {cin} input channels, ceil({cin}/32) words each)"
        )
    check_same_device("weight_packed.planes", w.planes, spikes_packed=spikes_packed, bias=bias)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or bias.shape != (O,):
            raise ValueError(f"bias must be a float32 tensor of shape ({O},), got {getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
    N, H, W, _ = spikes_packed.shape
    OH, OW = reference.output_size(H, W, KH, KW, stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"the output would be empty: input {H}x{W}, kernel {KH}x{KW}, stride {stride}, padding {padding}, dilation {dilation}")
    _check_tail_bits_zero(spikes_packed, cin, groups)
    backend = resolve_backend(backend, "bitconv2d", spikes_packed.device)
    return run(spikes_packed.contiguous(), w, bias, stride, padding, dilation, groups, backend)


def run(x, w: PackedWeight, bias, stride, padding, dilation, groups: int, backend: str) -> torch.Tensor:
    """The op on validated input (for layers that validated once). Eager calls go straight
    to the backend (the custom op's Python dispatch costs ~0.1 ms, 10% of a SEW-ResNet-18
    layer); torch.compile traces the custom op."""
    if torch.compiler.is_compiling():
        return _bitconv2d(x, w.planes, w.scale, bias, stride, padding, dilation, groups, backend)
    return _impl(backend).conv2d(x, w.planes, w.scale, bias, stride, padding, dilation, groups)


def packed_linear(
    x_packed: torch.Tensor, weight_packed: PackedWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Linear layer on packed {0,1} inputs: ``out = float32(x @ q.T) * scale (+ bias)``
    (bit for bit ``F.linear(x, q.double()).float() * scale + bias``).

    Args:
        x_packed: int32 ``[*, Wc]``, the input features packed along the last dim (``bitpack(x, -1)``).
        weight_packed: ``pack_weight(w_q, levels, scale)`` of a ``[O, C]`` weight.
        bias: float32 ``[O]`` or None.

    Returns:
        float32 ``[*, O]``.
    """
    w = _check_weight(weight_packed)
    if len(w.shape) != 2:
        raise ValueError(f"weight_packed must hold a linear weight [O, C], got shape {w.shape}")
    if not isinstance(x_packed, torch.Tensor) or x_packed.dtype != torch.int32 or x_packed.dim() < 1:
        raise TypeError(f"x_packed must be an int32 torch.Tensor [*, words] (bitpack), got {getattr(x_packed, 'dtype', type(x_packed))}")
    lead = x_packed.shape[:-1]
    conv_w = PackedWeight(w.planes, w.scale, (*w.shape, 1, 1), w.levels)
    out = packed_conv2d(x_packed.reshape(-1, 1, 1, x_packed.shape[-1]), conv_w, bias, backend=backend)
    return out.reshape(*lead, w.out_features)


