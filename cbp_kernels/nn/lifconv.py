"""``LIFConv2d``: convolution + BatchNorm + multi-step spiking neuron on ``[T, N, C, H, W]``,
the one-line replacement of SpikingJelly's
``nn.Sequential(layer.Conv2d, layer.BatchNorm2d, neuron.LIFNode)`` (step_mode ``"m"``).

What it does differently from that composition (same numbers, less memory and time):
- the convolution runs once over all T*N frames (one call, no per-step loop);
- in ``eval()`` the BatchNorm is folded into the convolution's weight and bias
  (W' = W * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps));
- the neuron is the fused op ``cbp_kernels.ops.multistep_neuron`` (IF / LIF / PLIF);
- in training, BatchNorm and the neuron are one autograd node that saves only the conv output
  (``bn_neuron.BatchNormNeuronFunction``: the backward recomputes BN's output), so the layer
  keeps one float tensor for the backward instead of two;
- tensors saved for the backward that hold spikes are stored compactly: {0, 1} tensors at
  1 bit per element (``cbp_kernels.ops.bitpack``: 32 spikes per int32 word), small
  non-negative integers (SEW ADD sums) at 8 bits. The convolution's own saved input goes
  through ``SpikeConv2dFunction``, the neuron's saved copy of its spikes through
  ``run_neuron_saving_packed_spikes``; output spikes are marked (``mark_spikes``) with their
  packed copy, which the next layer saves instead of packing again.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bitpack import bitpack, bitunpack
from .bn_neuron import batch_norm_neuron
from .neuron import IF, LIF, PLIF
from .packed import PackedConv2d

__all__ = ["LIFConv2d", "PackedLIFConv2d", "SpikeConv2dFunction", "compact_saved_tensors", "mark_spikes",
           "packed_if_spikes", "run_neuron_saving_packed_spikes"]

_NEURONS = {"if": IF, "lif": LIF, "plif": PLIF}


class _Compact:
    """A tensor stored in fewer bits: 1 bit for {0, 1} (``cbp_kernels.ops.bitpack`` words of
    the flattened tensor), 8 bits for integers in [0, 255] (uint8)."""

    __slots__ = ("data", "shape", "dtype", "bits")

    def __init__(self, data, shape, dtype, bits):
        self.data, self.shape, self.dtype, self.bits = data, shape, dtype, bits

    def restore(self) -> torch.Tensor:
        if self.bits == 1:
            return bitunpack(self.data, 0, self.shape.numel(), self.dtype).view(self.shape)
        return self.data.view(self.shape).to(self.dtype)


def _pack_spikes(t: torch.Tensor) -> _Compact:
    """``t`` known to hold only 0 and 1, at 1 bit per element."""
    return _Compact(bitpack(t.detach().reshape(-1), 0), t.shape, t.dtype, 1)


def mark_spikes(t: torch.Tensor, packed: _Compact | None = None) -> torch.Tensor:
    """Records that ``t`` holds only 0 and 1 (a neuron's output), optionally with its packed
    copy, so layers that save it for the backward reuse that copy (or pack it without a value
    check). The mark is void once ``t`` is modified in place."""
    t._cbp_spikes = (t._version, packed)
    return t


def packed_if_spikes(t: torch.Tensor) -> _Compact | None:
    """The 1-bit copy of ``t`` when ``t`` is marked spikes (made once, shared), else None."""
    mark = getattr(t, "_cbp_spikes", None)
    if mark is None or mark[0] != t._version:
        return None
    if mark[1] is None:
        mark_spikes(t, _pack_spikes(t))
    return t._cbp_spikes[1]


def _compact(t: torch.Tensor):
    """``_Compact`` of ``t`` when its values allow it (checked exactly unless ``t`` is marked
    spikes), else ``t`` itself. A strided sample of 1024 values rejects analogue tensors
    (membrane potentials, BN outputs) before any full pass."""
    packed = packed_if_spikes(t)
    if packed is not None:
        return packed
    if not t.is_floating_point() or t.numel() < 64:
        return t
    flat = t.detach().reshape(-1)
    probe = flat[:: max(1, flat.numel() // 1024)]
    if not bool(((probe == probe.trunc()) & (probe >= 0) & (probe <= 255)).all()):
        return t
    as_u8 = flat.to(torch.uint8)
    if not bool((flat == as_u8).all()):  # exact: also catches values out of [0, 255]
        return t
    if int(as_u8.max()) <= 1:
        return _Compact(bitpack(as_u8, 0), t.shape, t.dtype, 1)
    return _Compact(as_u8, t.shape, t.dtype, 8)


class _Deferred:
    """A saved tensor held as is until its producer knows whether it is its spike output."""

    __slots__ = ("value",)

    def __init__(self, t):
        self.value = t

    def restore(self) -> torch.Tensor:
        return _restore(self.value)


def _restore(saved):
    return saved.restore() if isinstance(saved, (_Compact, _Deferred)) else saved


def compact_saved_tensors():
    """Context manager: every tensor autograd saves inside it is stored in 1 bit per element
    when it holds only 0 and 1 (spikes), in 8 bits when it holds integers in [0, 255], and
    as is otherwise. Restored exactly in the backward."""
    return torch.autograd.graph.saved_tensors_hooks(_compact, _restore)


def run_neuron_saving_packed_spikes(neuron: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``neuron(x)`` whose saved copy of its output spikes is kept at 1 bit per spike (the
    other tensors it saves, e.g. the membrane potential, are kept as they are, unchecked).
    The output is marked as spikes for the layers that save it next."""
    held = []

    def hold(t):
        held.append(_Deferred(t))
        return held[-1]

    with torch.autograd.graph.saved_tensors_hooks(hold, _restore):
        spikes = neuron(x)
    packed = _pack_spikes(spikes)
    for d in held:
        t = d.value
        if t.shape == spikes.shape and t.data_ptr() == spikes.data_ptr():
            d.value = packed
    return mark_spikes(spikes, packed)


class SpikeConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) whose saved input x is stored compactly (1 bit per spike, see
    ``_compact``; ``packed``: x's compact copy, already made, with x's element order); x is
    kept only when the weight needs a gradient.

    Backward (one ``aten.convolution_backward`` call): dx = conv_transpose2d(dy, w),
    dw = correlate(x, dy), db = sum of dy over (N, H, W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, packed=None):
        if not ctx.needs_input_grad[1]:
            saved = x.new_empty(0)
        elif packed is not None:
            saved = _Compact(packed.data, x.shape, x.dtype, packed.bits)
        else:
            saved = _compact(x)
        ctx.compact = None if isinstance(saved, torch.Tensor) else (saved.shape, saved.dtype, saved.bits)
        ctx.save_for_backward(saved if isinstance(saved, torch.Tensor) else saved.data, weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # under autocast: in its dtype

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, bias_shape = ctx.conf
        if ctx.compact is not None:
            x = _Compact(x, *ctx.compact).restore()
        elif x.numel() == 0:  # weight grad not wanted: only the input's shape is used
            x = grad_y.new_zeros(()).expand(x_shape)
        # autocast ran the forward conv in grad_y's dtype (bf16 / fp16): so does the backward,
        # and each gradient returns in its input's dtype, as autocast's casts would give
        dt = grad_y.dtype
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, x.to(dt), weight.to(dt), bias_shape, stride, padding, dilation, False, [0, 0], groups,
            list(ctx.needs_input_grad[:3]),
        )
        gx, gw, gb = (g if g is None else g.to(t) for g, t in zip((gx, gw, gb), ctx.dtypes))
        return gx, gw, gb, None, None, None, None, None


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
        recompute_bn: in training with BN and a neuron, save only the conv output and recompute
            BN's output in the backward (one float tensor per layer kept instead of two).
        backend: the neuron op's backend.

    Shapes: input ``[T, N, in_channels, H, W]`` (float32 / float16 / bfloat16), output
    ``[T, N, out_channels, H', W']``: spikes (0/1) in the input's dtype, or the BatchNorm
    output when ``neuron=None``. The membrane potential is kept between calls until
    ``reset()`` (SpikingJelly's ``functional.reset_net`` calls it).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", bn=True, neuron="lif", tau=2.0, v_threshold=1.0, v_reset=0.0,
                 surrogate="atan", alpha=None, detach_reset=False, decay_input=True, weight_levels=None,
                 weight_scale=None, compact_spikes=True, recompute_bn=True, backend="auto", device=None,
                 dtype=None):
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
        self.recompute_bn = recompute_bn

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

    def _conv(self, x, weight, bias, packed):
        if self.compact_spikes and torch.is_grad_enabled():
            return SpikeConv2dFunction.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                             packed)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"LIFConv2d expects a multi-step input [T, N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"input has {x.shape[2]} channels, expected in_channels={self.in_channels}")
        t, n = x.shape[:2]
        frames = x.flatten(0, 1)
        # the previous layer's packed copy of its spikes (same element order when contiguous)
        packed = packed_if_spikes(x) if x.is_contiguous() and self.compact_spikes and torch.is_grad_enabled() else None
        fold = self.bn is not None and not self.training and self.bn.track_running_stats
        if fold:
            y = self._conv(frames, *self.folded_weight_bias(), packed)
        else:
            y = self._conv(frames, self.quantized_weight(), self.bias, packed)
            if self.bn is not None and self.neuron is not None and self.recompute_bn and torch.is_grad_enabled():
                return mark_spikes(batch_norm_neuron(y, self.bn, self.neuron, t))
            if self.bn is not None:
                y = self.bn(y)
        y = y.view(t, n, *y.shape[1:])
        if self.neuron is None:
            return y
        if self.compact_spikes and torch.is_grad_enabled():
            return run_neuron_saving_packed_spikes(self.neuron, y)
        return mark_spikes(self.neuron(y))

    def reset(self) -> None:
        """Forgets the membrane state (as SpikingJelly's ``functional.reset_net``)."""
        if self.neuron is not None:
            self.neuron.reset()

    @torch.no_grad()
    def pack(self, levels: str | None = None, backend: str = "auto") -> "PackedLIFConv2d":
        """The popcount inference form of this layer (binary or ternary weights): a
        ``PackedConv2d`` of the quantized weight (1 or 2 bits per weight), the BatchNorm's
        running statistics as a per-channel affine after it, and a copy of the neuron.
        Its input must be {0, 1} spikes. ``levels`` (``"binary"`` / ``"ternary"``) defaults
        to ``weight_levels``, or to the level set of CBP's quantization (``CBPQuantizer``
        turns this layer into a ``QuantizedLayer`` with a ``levels`` buffer); give it for a
        float layer whose weights already sit on scale * levels."""
        if levels is None:
            values = self.weight_levels
            if values is None and isinstance(getattr(self, "levels", None), torch.Tensor):
                values = self.levels.tolist()
            levels = {(-1.0, 1.0): "binary", (-1.0, 0.0, 1.0): "ternary"}.get(
                None if values is None else tuple(sorted(float(v) for v in values)))
        if levels not in ("binary", "ternary"):
            raise ValueError(f"pack() needs binary (-1, 1) or ternary (-1, 0, 1) weights, got {levels!r} "
                             f"(weight_levels={self.weight_levels})")
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, bias=False, device=self.weight.device)
        plain.weight.copy_(self.quantized_weight())
        gain, shift = None, self.bias
        if self.bn is not None:
            bn = self.bn
            gain = torch.rsqrt(bn.running_var + bn.eps)
            gain = gain if bn.weight is None else bn.weight * gain
            bias = torch.zeros_like(bn.running_mean) if self.bias is None else self.bias
            shift = (bias - bn.running_mean) * gain + (0 if bn.bias is None else bn.bias)
        conv = PackedConv2d.from_float(plain, levels, backend=backend)
        neuron = None if self.neuron is None else copy.deepcopy(self.neuron)
        if neuron is not None:
            neuron.reset()
        return PackedLIFConv2d(conv, gain, shift, neuron).eval()

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", bn={self.bn is not None}, neuron={self.neuron_type}"
        if self.weight_levels is not None:
            s += f", weight_levels={self.weight_levels}"
        return s


class PackedLIFConv2d(nn.Module):
    """``LIFConv2d.pack()``: popcount convolution of {0, 1} spikes with the packed quantized
    weight, y = gain * conv(x, Q) + shift per output channel (BatchNorm and bias), then the
    neuron. Input ``[T, N, C, H, W]`` spikes; output as ``LIFConv2d``'s (float32). Inference
    only: no gradient reaches the packed weight."""

    def __init__(self, conv: PackedConv2d, gain: torch.Tensor | None, shift: torch.Tensor | None,
                 neuron: nn.Module | None):
        super().__init__()
        self.conv, self.neuron = conv, neuron
        self.register_buffer("gain", None if gain is None else gain.detach().float().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected spikes [T, N, C, H, W], got shape {tuple(x.shape)}")
        y = self.conv(x)
        if self.gain is not None:
            y = y * self.gain.view(-1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.view(-1, 1, 1)
        return y if self.neuron is None else mark_spikes(self.neuron(y))

    def reset(self) -> None:
        if self.neuron is not None:
            self.neuron.reset()
