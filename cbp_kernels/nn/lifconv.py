"""``LIFConv2d``: convolution + BatchNorm + multi-step spiking neuron on ``[T, N, C, H, W]``,
the one-line replacement of SpikingJelly's
``nn.Sequential(layer.Conv2d, layer.BatchNorm2d, neuron.LIFNode)`` (step_mode ``"m"``).

What it does differently from that composition (same numbers, less memory and time):
- the convolution runs once over all T*N frames (one call, no per-step loop);
- in ``eval()`` the BatchNorm is folded into the convolution's weight and bias
  (W' = W * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps));
- the neuron is the fused op ``cbp_kernels.ops.multistep_neuron`` (IF / LIF / PLIF);
- tensors saved for the backward that hold spikes are stored compactly: {0, 1} tensors at
  1 bit per element (8 spikes per uint8), small non-negative integers (SEW ADD sums) at
  8 bits; the convolution's own saved input goes through ``SpikeConv2dFunction``, the
  neuron's saved spikes through ``compact_saved_tensors()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .neuron import IF, LIF, PLIF

__all__ = ["LIFConv2d", "SpikeConv2dFunction", "compact_saved_tensors", "pack_bits", "unpack_bits"]

_NEURONS = {"if": IF, "lif": LIF, "plif": PLIF}
# Packing 8 bytes b_0..b_7 (each 0 or 1) of a little-endian int64 word w into one byte:
# w * _GATHER puts b_i at bit 56 + i with no carries (every product term lands on its own bit),
# so (w * _GATHER) >> 56 is sum_i b_i << i.
_GATHER = 0x0102040810204080
# Unpacking: p * _SPREAD copies byte p into all 8 bytes; & _SELECT keeps bit i in byte i.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of 0/1 (any shape) -> flat uint8 of ceil(numel / 8) bytes, bit i of byte k
    holding element 8*k + i. (A private packer: cbp_kernels.ops.bitpack, the kernel version,
    was not on main when this layer was written.)"""
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_bits``: the 0/1 tensor of ``shape`` in ``dtype``."""
    words = (packed.to(torch.int64) * _SPREAD) & _SELECT
    return words.view(torch.uint8)[: shape.numel()].ne(0).view(shape).to(dtype)


class _Compact:
    """A tensor stored in fewer bits: 1 bit for {0, 1}, 8 bits for integers in [0, 255]."""

    __slots__ = ("data", "shape", "dtype", "bits")

    def __init__(self, data, shape, dtype, bits):
        self.data, self.shape, self.dtype, self.bits = data, shape, dtype, bits

    def restore(self) -> torch.Tensor:
        if self.bits == 1:
            return unpack_bits(self.data, self.shape, self.dtype)
        return self.data.to(self.dtype)


def _compact(t: torch.Tensor):
    """``_Compact`` of ``t`` when its values allow it (checked exactly), else ``t`` itself."""
    if not t.is_floating_point() or t.numel() < 64:
        return t
    lo, hi = torch.aminmax(t.detach())
    if bool(lo < 0) or bool(hi > 255):
        return t
    as_u8 = t.detach().to(torch.uint8)
    if not torch.equal(as_u8.to(t.dtype), t.detach()):
        return t
    if bool(hi <= 1):
        return _Compact(pack_bits(as_u8), t.shape, t.dtype, 1)
    return _Compact(as_u8, t.shape, t.dtype, 8)


def _restore(saved):
    return saved.restore() if isinstance(saved, _Compact) else saved


def compact_saved_tensors():
    """Context manager: every tensor autograd saves inside it is stored in 1 bit per element
    when it holds only 0 and 1 (spikes), in 8 bits when it holds integers in [0, 255], and
    as is otherwise. Restored exactly in the backward."""
    return torch.autograd.graph.saved_tensors_hooks(_compact, _restore)


class SpikeConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) whose saved input x is stored compactly (1 bit per spike, see
    ``_compact``); x is kept only when the weight needs a gradient.

    Backward (one ``aten.convolution_backward`` call): dx = conv_transpose2d(dy, w),
    dw = correlate(x, dy), db = sum of dy over (N, H, W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        saved = _compact(x) if ctx.needs_input_grad[1] else x.new_empty(0)
        ctx.compact = None if isinstance(saved, torch.Tensor) else (saved.shape, saved.dtype, saved.bits)
        ctx.save_for_backward(saved if isinstance(saved, torch.Tensor) else saved.data, weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, bias_shape = ctx.conf
        if ctx.compact is not None:
            x = _Compact(x, *ctx.compact).restore()
        elif x.numel() == 0:  # weight grad not wanted: only the input's shape is used
            x = grad_y.new_zeros(()).expand(x_shape)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, x, weight, bias_shape, stride, padding, dilation, False, [0, 0], groups,
            list(ctx.needs_input_grad[:3]),
        )
        return gx, gw, gb, None, None, None, None


class LIFConv2d(nn.Conv2d):
    """Conv2d -> BatchNorm2d -> IF / LIF / PLIF neuron over a multi-step input.

    Args (``torch.nn.Conv2d``'s, then SpikingJelly neuron's):
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: as ``torch.nn.Conv2d`` (``padding_mode="zeros"`` only).
        bn: add a ``BatchNorm2d(out_channels)`` (attribute ``bn``) after the convolution.
        neuron: ``"if"``, ``"lif"``, ``"plif"``, ``None`` (conv + BN only, no neuron), or a
            multi-step ``cbp_kernels.nn.IF / LIF / PLIF`` module (its settings win).
        tau: LIF time constant; for PLIF the initial one (``init_tau``).
        v_threshold, v_reset (``None``: soft reset), surrogate (name or SpikingJelly
        surrogate object), alpha, detach_reset, decay_input: as ``multistep_neuron``.
        weight_levels: the allowed weight values Q (e.g. ``(-1, 1)``, ``(-1, 0, 1)``); the
            forward then uses ``cbp_kernels.ops.quantize(weight, weight_levels, scale)``,
            CBP's straight-through quantization; ``weight_scale`` is the per-layer scale c
            (default the paper's c = mean |W|).
        compact_spikes: store spikes saved for the backward at 1 bit per spike.
        backend: the neuron op's backend.

    Shapes: input ``[T, N, in_channels, H, W]`` (float32 / float16 / bfloat16), output
    ``[T, N, out_channels, H', W']``: spikes (0/1) in the input's dtype, or the BatchNorm
    output when ``neuron=None``. The membrane potential is kept between calls until
    ``reset()`` (SpikingJelly's ``functional.reset_net`` calls it).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", bn=True, neuron="lif", tau=2.0, v_threshold=1.0, v_reset=0.0,
                 surrogate="atan", alpha=None, detach_reset=False, decay_input=True, weight_levels=None,
                 weight_scale=None, compact_spikes=True, backend="auto", device=None, dtype=None):
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
        if isinstance(neuron, nn.Module):
            if not isinstance(neuron, tuple(_NEURONS.values())) or neuron.step_mode != "m":
                raise ValueError(f"a neuron module must be a multi-step cbp_kernels.nn IF / LIF / PLIF, got {neuron!r}")
        elif neuron is not None and neuron not in _NEURONS:
            raise ValueError(f"neuron must be one of {sorted(_NEURONS)}, None or a neuron module, got {neuron!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError("padding must be numbers (string padding is not supported)")
        self.bn = nn.BatchNorm2d(out_channels, device=device, dtype=dtype) if bn else None
        if isinstance(neuron, nn.Module):
            self.neuron_type = {cls: name for name, cls in _NEURONS.items()}[type(neuron)]
            self.neuron = neuron
        elif neuron is None:
            self.neuron_type = self.neuron = None
        else:
            self.neuron_type = neuron
            kw = dict(v_threshold=v_threshold, v_reset=v_reset, surrogate_function=surrogate, alpha=alpha,
                      detach_reset=detach_reset, step_mode="m", backend=backend)
            if neuron == "lif":
                kw.update(tau=tau, decay_input=decay_input)
            elif neuron == "plif":
                kw.update(init_tau=tau, decay_input=decay_input)
            self.neuron = _NEURONS[neuron](**kw)
        self.weight_levels = None if weight_levels is None else tuple(float(q) for q in weight_levels)
        self.weight_scale = weight_scale
        self.compact_spikes = compact_spikes

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight``, or its CBP quantization when
        ``weight_levels`` is set."""
        if self.weight_levels is None:
            return self.weight
        from ..ops import quantize  # noqa: PLC0415  (the quantizer op lives below nn/)

        scale = self.weight_scale if self.weight_scale is not None else self.weight.detach().abs().mean()
        levels = torch.tensor(sorted(self.weight_levels), dtype=torch.float32, device=self.weight.device)
        return quantize(self.weight, levels, scale)

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with the BatchNorm's running statistics folded in (the eval forward)."""
        weight, bias = self.quantized_weight(), self.bias
        if self.bn is None:
            return weight, bias
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = inv_std if bn.weight is None else bn.weight * inv_std
        beta = torch.zeros_like(bn.running_mean) if bn.bias is None else bn.bias
        bias0 = torch.zeros_like(bn.running_mean) if bias is None else bias
        return weight * gamma.view(-1, 1, 1, 1), beta + (bias0 - bn.running_mean) * gamma

    def _conv(self, x, weight, bias):
        if self.compact_spikes and torch.is_grad_enabled():
            return SpikeConv2dFunction.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"LIFConv2d expects a multi-step input [T, N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"input has {x.shape[2]} channels, expected in_channels={self.in_channels}")
        t, n = x.shape[:2]
        frames = x.flatten(0, 1)
        fold = self.bn is not None and not self.training and self.bn.track_running_stats
        if fold:
            y = self._conv(frames, *self.folded_weight_bias())
        else:
            y = self._conv(frames, self.quantized_weight(), self.bias)
            if self.bn is not None:
                y = self.bn(y)
        y = y.view(t, n, *y.shape[1:])
        if self.neuron is None:
            return y
        if self.compact_spikes and torch.is_grad_enabled():
            with compact_saved_tensors():
                return self.neuron(y)
        return self.neuron(y)

    def reset(self) -> None:
        """Forgets the membrane state (as SpikingJelly's ``functional.reset_net``)."""
        if self.neuron is not None:
            self.neuron.reset()

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", bn={self.bn is not None}, neuron={self.neuron_type}"
        if self.weight_levels is not None:
            s += f", weight_levels={self.weight_levels}"
        return s
