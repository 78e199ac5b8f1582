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


import torch
import torch.nn.functional as F
from torch import nn

from ..ops import quantize
from ..ops.bitconv import PackedWeight, pack_spikes, packed_conv2d_lif
from ..ops.bitpack import bitpack, bitunpack, pack_bits
from ..ops.conv_input_grad import conv2d_integer_input, conv_input_grad
from ..ops.conv_weight_grad import conv_weight_grad
from ..ops.levels import LevelSet
from .bn_neuron import batch_norm_neuron, fold_batch_norm
from .integer_forward import check_input_max, integer_conv2d, integer_spec, popcount_name
from .neuron import IF, LIF, PLIF
from .bitconv import PackedConv2d

__all__ = ["LIFConv2d", "PackedLIFConv2d", "SpikeConv2dFunction", "compact_saved_tensors", "mark_spikes",
           "packed_if_spikes", "run_neuron_saving_packed_spikes"]

_NEURONS = {"if": IF, "lif": LIF, "plif": PLIF}


class _Compact:
    """A tensor stored in fewer bits: 1 bit for {0, 1} (``cbp_kernels.ops.bitpack`` words of
    the flattened tensor), 8 bits for integers in [0, 255] (uint8)."""

    __slots__ = ("data", "shape", "dtype", "bits")

    def __init__(self, data, shape, dtype, bits):
        self.data, self.shape, self.dtype, self.bits = data, shape, dtype, bits

    def restore(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, in its own dtype or ``dtype`` (e.g. uint8, which ``ops.conv_weight_grad`` reads)."""
        dtype = self.dtype if dtype is None else dtype
        if self.bits == 1:
            return bitunpack(self.data, 0, self.shape.numel(), dtype).view(self.shape)
        return self.data.view(self.shape).to(dtype)


def _pack_spikes(t: torch.Tensor) -> _Compact:
    """``t`` known to hold only 0 and 1, at 1 bit per element."""
    return _compact_known(t, 1)


def mark_spikes(t: torch.Tensor, packed: _Compact | None = None) -> torch.Tensor:
    """Records that ``t`` holds only 0 and 1 (a neuron's output), optionally with its packed
    copy, so layers that save it for the backward reuse that copy (or pack it without a value
    check); ``compact_declared`` records a declared integer input's copy the same way. The
    mark is void once ``t`` is modified in place. Under ``torch.compile`` nothing is marked
    (a tensor attribute breaks the graph; the compiled layers save spikes as is)."""
    if not torch.compiler.is_compiling():
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


def _compact_known(t: torch.Tensor, input_max: int) -> _Compact:
    """``t`` declared to hold integers in [0, ``input_max``] (a layer's ``input_max``),
    stored compactly without a value check: 1 bit per element for input_max 1, else 8 bits."""
    if input_max == 1:
        return _Compact(pack_bits(t.detach().reshape(1, -1)).reshape(-1), t.shape, t.dtype, 1)
    return _Compact(t.detach().to(torch.uint8), t.shape, t.dtype, 8)


def compact_declared(t: torch.Tensor, input_max: int) -> _Compact:
    """The compact copy of ``t``, declared to hold integers in [0, ``input_max``], made once
    per tensor without a value check and kept with it as a spike mark's copy (``mark_spikes``),
    so every layer that reads ``t`` (a SEW block's conv and its downsample) saves the same one."""
    packed = packed_if_spikes(t)
    if packed is None:
        packed = _compact_known(t, input_max)
        mark_spikes(t, packed)
    return packed


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


# The tile ops for a float32 weight where they beat oneDNN's float32: one thread, min of 9, 3x3 s1
# p1 C = O, F.conv2d / conv2d_integer_input on spikes: 512@7 N = 1 (49 output pixels) 1.13x,
# N = 4 1.65x; 128@4 N = 2 (32) 0.87x; 64@56 N = 4 3.4x; conv_input_grad's 6 products of parts
# against ATen's input gradient: 512@7 N = 2 (98) 0.80x, N = 4 (196) 1.01x, 256@14 N = 1 (196)
# 1.30x, N = 4 (784) 1.52x (the weight's parts, prepared per call, against fewer pixels).
TILE_FORWARD_MIN_PIXELS = 48  # N * OH * OW
TILE_INPUT_GRAD_MIN_PIXELS = 256  # N * OH * OW, a float (not binary / ternary) weight


def _tile_forward_applies(x, weight, bias, stride, padding) -> bool:
    """Whether the forward of a tile layer (``SpikeConv2dFunction``, x saved as integers) runs
    ``conv2d_integer_input``: stride 1, no bias, padding < the kernel, not under autocast, and
    enough output pixels (``TILE_FORWARD_MIN_PIXELS``)."""
    kh, kw = weight.shape[-2:]
    pixels = x.shape[0] * (x.shape[2] + 2 * padding[0] - kh + 1) * (x.shape[3] + 2 * padding[1] - kw + 1)
    return (tuple(stride) == (1, 1) and bias is None and padding[0] < kh and padding[1] < kw
            and not torch.is_autocast_enabled("cpu") and pixels >= TILE_FORWARD_MIN_PIXELS)


def _tile_backward(grad_y, x, w, scale, x_shape, stride, padding, needs):
    """A convolution's float32 backward on AMX-BF16, for an input x of integers (spikes, SEW ADD
    sums, exact in bfloat16; only read for dw): dx = conv_transpose2d(dy, w)
    (``ops.conv_input_grad``: for a binary / ternary Q(W) = s * q, ``scale`` s, as
    s * conv_transpose2d(dy, q), q = sign(Q(W)) since s > 0, read by the op from Q(W)
    (``weight_sign``): q is exact in bfloat16; a float
    weight, ``scale`` None, in three parts, where at least ``TILE_INPUT_GRAD_MIN_PIXELS``, else
    ATen's float32), dw = correlate(x, dy) (``ops.conv_weight_grad``), db = sum of dy over (N, H,
    W). Both ops split dy exactly into three bfloat16 parts: every product exact (a float
    weight: the 6 products of parts that matter), float32 sums in another order than oneDNN's
    float32, as accurate; ATen's float32 inside the ops where AMX-BF16 is not usable."""
    grad_y = grad_y.contiguous()
    gx = None
    if needs[0] and scale is not None:
        gx = conv_input_grad(grad_y, w, x_shape[-2:], stride, padding, float(scale), weight_sign=True)
    elif needs[0] and grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3] >= TILE_INPUT_GRAD_MIN_PIXELS:
        gx = conv_input_grad(grad_y, w, x_shape[-2:], stride, padding, 1.0)
    elif needs[0]:
        gx = torch.ops.aten.convolution_backward(grad_y, grad_y.new_zeros(()).expand(x_shape), w, None, stride, padding,
                                                 [1, 1], False, [0, 0], 1, [True, False, False])[0]
    gw = conv_weight_grad(grad_y, x, tuple(w.shape[-2:]), stride, padding) if needs[1] else None
    gb = grad_y.sum((0, 2, 3)) if needs[2] else None
    return gx, gw, gb


class SpikeConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) whose saved input x is stored compactly (1 bit per spike, see
    ``_compact``; ``packed``: x's compact copy, already made, with x's element order); x is
    kept only when the weight needs a gradient.

    ``integer``: an ``integer_forward.IntegerForward``: the forward is the exact
    ``integer_conv2d`` (w = Q(W) = s * q, x integers in [0, integer.input_max], saved in 1 or
    8 bits without a value check; ``compact=False``: saved as is). ``scale``: s of a binary /
    ternary w = s * q on the float forward (the integer forward's is ``integer.scale``).

    Forward otherwise: with ``tile``, on the CPU in float32 with x saved compactly (integers),
    ``conv2d_integer_input`` where ``_tile_forward_applies`` (stride 1, no bias: x's one
    bfloat16 part times the weight's three, every product exact on AMX-BF16), else F.conv2d.

    Backward: with ``tile``, on the CPU in float32 (groups 1, dilation 1) with x saved compactly
    (integers) or not needed, ``_tile_backward``'s (the same gradients, every product exact on
    AMX-BF16); otherwise one ``aten.convolution_backward`` call: dx = conv_transpose2d(dy, w),
    dw = correlate(x, dy), db = sum of dy over (N, H, W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, packed=None, integer=None, compact=True,
                tile=True, scale=None):
        if not ctx.needs_input_grad[1]:
            saved = x.new_empty(0)
        elif packed is not None:
            saved = _Compact(packed.data, x.shape, x.dtype, packed.bits)
        elif integer is not None:
            saved = _compact_known(x, integer.input_max) if compact else x
        else:
            saved = _compact(x)
        ctx.compact = None if isinstance(saved, torch.Tensor) else (saved.shape, saved.dtype, saved.bits)
        ctx.save_for_backward(saved if isinstance(saved, torch.Tensor) else saved.data, weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.tile = (tile and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and groups == 1
                    and tuple(dilation) == (1, 1) and (ctx.compact is not None or not ctx.needs_input_grad[1]))
        ctx.scale = integer.scale if integer is not None else scale
        if integer is not None:
            return integer_conv2d(x, weight, bias, stride, padding, dilation, groups, integer)
        if ctx.tile and ctx.compact is not None and _tile_forward_applies(x, weight, bias, stride, padding):
            return conv2d_integer_input(x, weight, padding)  # x integers (saved compactly): 3 exact products each
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # under autocast: in its dtype

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, bias_shape = ctx.conf
        tile = ctx.tile and grad_y.dtype == torch.float32
        if ctx.compact is not None:  # the tile backward reads the integers as uint8 (4x fewer bytes)
            x = _Compact(x, *ctx.compact).restore(torch.uint8 if tile else None)
        elif x.numel() == 0:  # weight grad not wanted: only the input's shape is used
            x = grad_y.new_zeros(()).expand(x_shape)
        if tile:
            gx, gw, gb = _tile_backward(grad_y, x, weight, ctx.scale, x_shape, stride, padding, ctx.needs_input_grad)
            return gx, gw, gb, None, None, None, None, None, None, None, None, None
        # autocast ran the forward conv in grad_y's dtype (bf16 / fp16): so does the backward,
        # and each gradient returns in its input's dtype, as autocast's casts would give
        dt = grad_y.dtype
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, x.to(dt), weight.to(dt), bias_shape, stride, padding, dilation, False, [0, 0], groups,
            list(ctx.needs_input_grad[:3]),
        )
        gx, gw, gb = (g if g is None else g.to(t) for g, t in zip((gx, gw, gb), ctx.dtypes))
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


class LIFConv2d(nn.Conv2d):
    """Conv2d -> BatchNorm2d -> IF / LIF / PLIF neuron over a multi-step input.

    Args (``torch.nn.Conv2d``'s, then SpikingJelly neuron's):
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: as ``torch.nn.Conv2d`` (``padding_mode="zeros"`` only).
        bn: add a ``BatchNorm2d(out_channels)`` (attribute ``bn``) after the convolution.
        neuron: ``"if"``, ``"lif"``, ``"plif"``, ``None`` (conv + BN only, no neuron), or a
            multi-step ``cbp_kernels.nn.IF / LIF / PLIF`` module (its settings win).
        tau: LIF time constant; for PLIF the initial one (``init_tau``).
        v_threshold, v_reset (``None``: soft reset), surrogate_function (name or SpikingJelly
        surrogate object; SpikingJelly's default Sigmoid(alpha=4)), alpha, detach_reset,
        decay_input: as SpikingJelly's ``LIFNode`` / ``multistep_neuron``.
        weight_levels: the allowed weight values Q (a ``LevelSet``, ``"binary"``, ``"ternary"``
            or sorted numbers such as ``(-1, 0, 1)``), kept as the ``levels`` buffer (the one
            place the layer's levels live: ``CBPQuantizer`` sets the same buffer); the
            forward then uses ``cbp_kernels.ops.quantize(weight, levels, scale)``,
            CBP's straight-through quantization; ``weight_scale`` is the per-layer scale c
            (default the paper's c = mean |W|).
        input_max: None (the input is real-valued, e.g. images) or k: the input holds
            integers in [0, k] (spikes: 1; SEW ADD sums: the block depth), declared by the
            model. With binary / ternary ``levels``, the convolution then runs the exact
            integer forward (``nn.integer_forward``: float32(count) * scale, counted by the
            popcount convolution) where it is the faster forward (attribute
            ``integer_forward``: True; ``"always"``: wherever it applies; False: never); the
            backward is the float one. Not where BatchNorm is folded (eval) or under
            autocast / compile. On the CPU in float32, a layer whose input is saved as
            integers (spikes, declared sums) runs its convolution's products exactly on
            AMX-BF16 (``SpikeConv2dFunction``'s ``tile``: the forward of float weights at
            stride 1, both gradients), float32 sums in another order than oneDNN's;
            ``integer_forward = False`` keeps ATen's float32 forward and backward there too
            (the authors' / SpikingJelly's rounding, for lock-step comparisons; so does
            ``CBP_KERNELS_NO_AMX=1`` for every layer).
        compact_spikes: store spikes saved for the backward at 1 bit per spike (eager only:
            under ``torch.compile`` they are saved as is).
        recompute_bn: in training with BN and a neuron, save only the conv output and recompute
            BN's output in the backward (one float tensor per layer kept instead of two).
        backend: the neuron op's backend.

    Shapes: input ``[T, N, in_channels, H, W]`` (float32 / float16 / bfloat16), output
    ``[T, N, out_channels, H', W']``: spikes (0/1) in the input's dtype, or the BatchNorm
    output when ``neuron=None``. The membrane potential is kept between calls until
    ``reset()`` (SpikingJelly's ``functional.reset_net`` calls it).
    """

    # defaults for instances unpickled from before these attributes existed
    input_max: int | None = None
    integer_forward: bool | str = True
    popcount_levels: str | None = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", bn=True, neuron="lif", tau=2.0, v_threshold=1.0, v_reset=0.0,
                 surrogate_function="sigmoid", alpha=None, detach_reset=False, decay_input=True, weight_levels=None,
                 weight_scale=None, input_max=None, compact_spikes=True, recompute_bn=True, backend="auto",
                 device=None, dtype=None):
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
            kw = dict(v_threshold=v_threshold, v_reset=v_reset, surrogate_function=surrogate_function, alpha=alpha,
                      detach_reset=detach_reset, step_mode="m", backend=backend)
            if neuron == "lif":
                kw.update(tau=tau, decay_input=decay_input)
            elif neuron == "plif":
                kw.update(init_tau=tau, decay_input=decay_input)
            self.neuron = _NEURONS[neuron](**kw)
        levels = None if weight_levels is None else LevelSet(weight_levels).tensor(self.weight.device)
        self.register_buffer("levels", levels)
        self.popcount_levels = None if weight_levels is None else popcount_name(weight_levels)
        self.weight_scale = weight_scale
        self.input_max = check_input_max(input_max)
        self.integer_forward = True
        self.compact_spikes = compact_spikes
        self.recompute_bn = recompute_bn

    @property
    def weight_levels(self) -> tuple[float, ...] | None:
        """The values of the ``levels`` buffer (None: a float layer)."""
        return None if self.levels is None else tuple(self.levels.tolist())

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight``, or its CBP quantization when
        ``levels`` is set."""
        if self.levels is None:
            return self.weight
        return quantize(self.weight, self.levels, self.quant_scale())

    def quant_scale(self) -> torch.Tensor | float:
        """The scale c of ``quantized_weight``: ``weight_scale``, else the paper's mean |W|."""
        return self.weight_scale if self.weight_scale is not None else self.weight.detach().abs().mean()

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with the BatchNorm's running statistics folded in (the eval forward)."""
        weight, bias = self.quantized_weight(), self.bias
        if self.bn is None:
            return weight, bias
        gain, shift = fold_batch_norm(self.bn, bias)
        return weight * gain.view(-1, 1, 1, 1), shift

    def _conv(self, x, weight, bias, packed, compact, integer=None):
        conv = (self.stride, self.padding, self.dilation, self.groups)
        if integer is not None and not torch.is_grad_enabled():
            return integer_conv2d(x, weight, bias, *conv, integer)
        if compact or integer is not None:
            # integer_forward=False keeps ATen's forward and backward (the authors' / SpikingJelly's rounding)
            tile = self.integer_forward is not False
            scale = self.quant_scale() if self.popcount_levels is not None else None  # w = s * q
            return SpikeConv2dFunction.apply(x, weight, bias, *conv, packed, integer, compact, tile, scale)
        return F.conv2d(x, weight, bias, *conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"LIFConv2d expects a multi-step input [T, N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"input has {x.shape[2]} channels, expected in_channels={self.in_channels}")
        t, n = x.shape[:2]
        frames = x.flatten(0, 1)
        compact = self.compact_spikes and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        # the previous layer's packed copy of its spikes, or of the integers the model declares
        # (input_max), without a value check (the same element order when contiguous)
        packed = None
        if compact and x.is_contiguous():
            packed = packed_if_spikes(x)
            if packed is None and self.input_max is not None and self.weight.requires_grad:
                packed = compact_declared(x, self.input_max)
        fold = self.bn is not None and not self.training and self.bn.track_running_stats
        if fold:
            y = self._conv(frames, *self.folded_weight_bias(), packed, compact)
        else:
            weight = self.quantized_weight()
            integer = None
            if self.levels is not None and self.input_max is not None:
                integer = integer_spec(self, frames, weight, self.quant_scale(), 4)
            y = self._conv(frames, weight, self.bias, packed, compact, integer)
            if self.bn is not None and self.neuron is not None and self.recompute_bn and torch.is_grad_enabled():
                return mark_spikes(batch_norm_neuron(y, self.bn, self.neuron, t))
            if self.bn is not None:
                y = self.bn(y)
        y = y.view(t, n, *y.shape[1:])
        if self.neuron is None:
            return y
        if compact:
            return run_neuron_saving_packed_spikes(self.neuron, y)
        return mark_spikes(self.neuron(y))

    def reset(self) -> None:
        """Forgets the membrane state (as SpikingJelly's ``functional.reset_net``)."""
        if self.neuron is not None:
            self.neuron.reset()

    @torch.no_grad()
    def pack(self, levels: str | LevelSet | None = None, backend: str = "auto",
             weight: PackedWeight | None = None) -> "PackedLIFConv2d":
        """The popcount inference form of this layer (binary or ternary weights), a
        ``PackedLIFConv2d``: a ``PackedConv2d`` of the quantized weight (1 or 2 bits per
        weight), the BatchNorm's running statistics as a per-channel affine after it and the
        neuron, run as one fused ``ops.packed_conv2d_lif``. Its input must be {0, 1} spikes.
        ``levels`` (``"binary"`` / ``"ternary"``) defaults to the ``levels`` buffer
        (``weight_levels=``, or CBP's quantization); give it for a float layer whose weights
        already sit on scale * levels. ``weight``: the packed weight to use as it is (e.g. read
        from a file by ``load_packed``) instead of packing this layer's own."""
        if weight is None:
            if levels is None and self.levels is not None:
                levels = LevelSet(self.levels)
            if levels is None or not LevelSet(levels).popcount:
                raise ValueError(f"pack() needs binary (-1, 1) or ternary (-1, 0, 1) weights, got {levels!r} "
                                 f"(weight_levels={self.weight_levels})")
            plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                              self.dilation, self.groups, bias=False, device=self.weight.device)
            plain.weight.copy_(self.quantized_weight())
            conv = PackedConv2d.from_float(plain, LevelSet(levels).name, backend=backend)
        else:
            conv = PackedConv2d(weight, None, tuple(self.stride), tuple(self.padding), tuple(self.dilation),
                                self.groups, backend)
        gain, shift = (None, self.bias) if self.bn is None else fold_batch_norm(self.bn, self.bias)
        return PackedLIFConv2d(conv, gain, shift, self._fused_neuron()).eval()

    def _fused_neuron(self) -> dict | None:
        """The neuron's arguments of ``ops.packed_conv2d_lif`` (PLIF: a LIF with its current tau)."""
        n = self.neuron
        if n is None:
            return None
        kw = dict(neuron="if" if self.neuron_type == "if" else "lif", v_threshold=float(n.v_threshold),
                  v_reset=None if n.v_reset is None else float(n.v_reset))
        if self.neuron_type != "if":
            # PLIF's tau = 1 / sigmoid(w) in float32, as its own forward computes it
            kw.update(tau=float(n._tau()), decay_input=bool(n.decay_input))
        return kw

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", bn={self.bn is not None}, neuron={self.neuron_type}"
        if self.weight_levels is not None:
            s += f", weight_levels={self.weight_levels}"
        return s


class PackedLIFConv2d(nn.Module):
    """``LIFConv2d.pack()``: the popcount inference form of the layer, one fused
    ``ops.packed_conv2d_lif`` per call: the convolution of {0, 1} spikes with the packed
    quantized weight, y = c * scale * gain + shift per output channel (the BatchNorm's running
    statistics and the conv bias folded in), the IF / LIF neuron over T (PLIF with its learned
    tau) and the packing of its spikes; no float activation is written.

    Input ``[T, N, C, H, W]`` {0, 1} spikes; output float32 spikes ``[T, N, O, OH, OW]``
    (channels-last memory); ``forward_packed`` takes and returns packed spike words, for a
    chain of packed layers. Each call starts from V = v_reset (the state after ``reset()``),
    so a sequence is given whole, not step by step. ``neuron=None`` (conv + BN only): the
    float ``gain * conv + shift``. Inference only: no gradient.

    Args:
        conv: the ``PackedConv2d`` of the quantized weight (no bias).
        gain, shift: float32 ``[O]`` per-channel affine after the conv, or None (1 / 0).
        neuron: the fused op's neuron arguments (``neuron``, ``tau``, ``v_threshold``,
            ``v_reset``, ``decay_input``; see ``packed_conv2d_lif``), or None.
    """

    def __init__(self, conv: PackedConv2d, gain: torch.Tensor | None, shift: torch.Tensor | None,
                 neuron: dict | None):
        super().__init__()
        if neuron is not None and conv.groups > 1 and (conv.weight_shape[0] // conv.groups) % 32:
            raise ValueError(f"the fused packed layer needs out_channels / groups to be a multiple of 32 with "
                             f"groups > 1, got {conv.weight_shape[0]} / {conv.groups}")
        self.conv, self.neuron = conv, None if neuron is None else dict(neuron)
        self.register_buffer("gain", None if gain is None else gain.detach().float().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().float().clone())

    def forward_packed(self, spikes_packed: torch.Tensor, T: int) -> torch.Tensor:
        """int32 ``[T*N, H, W, words]`` packed spikes (``pack_spikes``, t major) -> int32
        ``[T*N, OH, OW, ceil(O/32)]``, the input format of the next packed layer."""
        c = self.conv
        scale = c.weight_scale if self.gain is None else c.weight_scale * self.gain  # y = c * scale * gain + shift
        spikes, _ = packed_conv2d_lif(spikes_packed, c.weight, T, scale.expand(c.weight_shape[0]).contiguous(),
                                      self.shift, c.stride, c.padding, c.dilation, c.groups, backend=c.backend,
                                      **self.neuron)
        return spikes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected spikes [T, N, C, H, W], got shape {tuple(x.shape)}")
        if self.neuron is None:
            y = self.conv(x)
            y = y if self.gain is None else y * self.gain.view(-1, 1, 1)
            return y if self.shift is None else y + self.shift.view(-1, 1, 1)
        T, N = x.shape[:2]
        words = self.forward_packed(pack_spikes(x.flatten(0, 1).movedim(1, -1), self.conv.groups,
                                                backend=self.conv.backend), T)
        spikes = bitunpack(words, -1, self.conv.weight_shape[0], backend=self.conv.backend)
        return mark_spikes(spikes.unflatten(0, (T, N)).movedim(-1, 2))

    def reset(self) -> None:
        """Nothing to forget: every call starts from V = v_reset (kept for ``reset_net``)."""

    def extra_repr(self) -> str:
        return f"neuron={self.neuron}"
