"""The public bit-packed convolution ops: validation, backend choice and their two
torch.library custom ops with fakes (so torch.compile traces them): ``cbp_kernels::bitconv2d``
(``packed_conv2d``; ``packed_linear`` is it on 1x1 pixels) and ``cbp_kernels::bitconv2d_lif``
(``packed_conv2d_lif``). Eager calls run the backend directly (``_backend.call``). Inference
ops: int32 inputs, no autograd.

Layout: spikes NHWC packed along C (``bitpack(x_nhwc, -1)``), time folded into the batch
([T*N, H, W, Cw]); output float32 NHWC [N, OH, OW, O]. For ``groups > 1`` each group's
channels are packed on their own: ``bitpack(x.unflatten(-1, (groups, C // groups)), -1)
.flatten(-2)`` (the same as packing C at once when C / groups is a multiple of 32);
``pack_spikes`` does it.
"""
from __future__ import annotations

import torch

from .._backend import call, kernels, resolve_backend
from ..bitpack import WORD_BITS, packed_size
from ..bitpack.op import pack_along
from ..neuron.params import NEURONS, NeuronParams
from ..utils import check_choice, check_finite, check_pair, check_same_device
from . import reference
from .weight import PackedWeight

__all__ = ["packed_conv2d", "packed_conv2d_lif", "packed_linear", "pack_spikes"]

def _conv2d(
    x: torch.Tensor, planes: torch.Tensor, scale: float, bias: torch.Tensor | None, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, backend: str,
) -> torch.Tensor:
    return kernels(__package__, backend).conv2d(x, planes, scale, bias, stride, padding, dilation, groups)


_bitconv2d = torch.library.custom_op("cbp_kernels::bitconv2d", _conv2d, mutates_args=())


@_bitconv2d.register_fake
def _(x, planes, scale, bias, stride, padding, dilation, groups, backend):
    return reference.Geometry.of(x, planes, stride, padding, dilation, groups).empty_output(x)


def _conv2d_lif(
    x: torch.Tensor, planes: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, T: int, decay: float, v_threshold: float,
    v_reset: float | None, kind: int, decay_input: bool, detach_reset: bool, surrogate: int, alpha: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # the neuron's scalars are NeuronParams' fields in order (p.fields()): NeuronParams(*them) is p
    p = NeuronParams(v_threshold, v_reset, kind, decay_input, detach_reset, surrogate, alpha)
    return kernels(__package__, backend).conv2d_lif(x, planes, mul, add, stride, padding, dilation, groups, T, decay, p)


_bitconv2d_lif = torch.library.custom_op("cbp_kernels::bitconv2d_lif", _conv2d_lif, mutates_args=())


@_bitconv2d_lif.register_fake
def _(x, planes, mul, add, stride, padding, dilation, groups, T, *args):
    return reference.Geometry.of(x, planes, stride, padding, dilation, groups).empty_lif_outputs(x, T)


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
    stride, padding, dilation = _check_conv(spikes_packed, w, stride, padding, dilation, groups)
    check_same_device("weight_packed.planes", w.planes, bias=bias)
    _check_channel_vector("bias", bias, w.out_features)
    backend = resolve_backend(backend, "bitconv2d", spikes_packed.device, __package__)
    bias = None if bias is None else bias.contiguous()  # the kernels read it as a float32 [O] array
    return run(spikes_packed.contiguous(), w, bias, stride, padding, dilation, groups, backend)


def _check_channel_vector(name: str, t, O: int) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (O,)):
        raise ValueError(f"{name} must be a float32 tensor of shape ({O},), got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def _check_conv(spikes_packed, w: PackedWeight, stride, padding, dilation, groups):
    """Checks the packed spikes against the weight and the conv arguments; returns
    (stride, padding, dilation) as pairs."""
    if len(w.shape) != 4:
        raise ValueError(f"weight_packed must hold a conv weight [O, Cg, KH, KW], got shape {w.shape}")
    if not isinstance(spikes_packed, torch.Tensor) or spikes_packed.dtype != torch.int32:
        raise TypeError(
            f"spikes_packed must be an int32 torch.Tensor of packed spikes (bitpack), got {getattr(spikes_packed, 'dtype', type(spikes_packed))}"
        )
    if spikes_packed.dim() != 4:
        raise ValueError(f"spikes_packed must be [N, H, W, words] (NHWC, time folded into N), got shape {tuple(spikes_packed.shape)}")
    stride, padding = check_pair("stride", stride, 1), check_pair("padding", padding, 0)
    dilation = check_pair("dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1 or w.out_features % groups:
        raise ValueError(f"groups must be an int >= 1 dividing the {w.out_features} output channels, got {groups!r}")
    O, cin, KH, KW = w.shape
    words = groups * packed_size(cin)
    if spikes_packed.shape[-1] != words:
        raise ValueError(
            f"spikes_packed has {spikes_packed.shape[-1]} words per pixel but the weight needs {words} "
            f"({groups} group(s) of {cin} input channels, ceil({cin}/32) words each)"
        )
    check_same_device("weight_packed.planes", w.planes, spikes_packed=spikes_packed)
    N, H, W, _ = spikes_packed.shape
    OH, OW = reference.output_size(H, W, KH, KW, stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"the output would be empty: input {H}x{W}, kernel {KH}x{KW}, stride {stride}, padding {padding}, dilation {dilation}")
    _check_tail_bits_zero(spikes_packed, cin, groups)
    return stride, padding, dilation


def run(x, w: PackedWeight, bias, stride, padding, dilation, groups: int, backend: str) -> torch.Tensor:
    """The op on validated input (for layers that validated once)."""
    return call(_bitconv2d, _conv2d, x, w.planes, w.scale, bias, stride, padding, dilation, groups, backend)


def packed_conv2d_lif(
    spikes_packed: torch.Tensor,
    weight_packed: PackedWeight,
    T: int,
    channel_scale: torch.Tensor | None = None,
    channel_shift: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    neuron: str = "lif",
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed convolution with the fused epilogue: per-channel affine, the IF / LIF neuron
    over T timesteps and packing of the output spikes, so a chain of packed layers never
    writes float activations.

    ``y[t] = float32(c[t]) * channel_scale + channel_shift`` (c the exact integer count of
    ``packed_conv2d``), then SpikingJelly's multi-step neuron on y from ``v_reset`` (0 for
    the soft reset), bit for bit ``multistep_neuron(y, ...)`` (see ``reference.conv2d_lif``).
    A BatchNorm after the conv folds into the affine: ``channel_scale = s * g / sqrt(var + eps)``,
    ``channel_shift = (bias - mean) * g / sqrt(var + eps) + beta``.

    Args:
        spikes_packed: int32 ``[T*N, H, W, groups * Wg]`` (t major), as ``packed_conv2d``.
        weight_packed: a packed ``[O, C/groups, KH, KW]`` weight.
        T: the timesteps folded into the batch.
        channel_scale: float32 ``[O]``; default the weight's scale.
        channel_shift: float32 ``[O]``; default 0.
        stride, padding, dilation, groups: as ``packed_conv2d`` (groups > 1 needs
            ``O / groups`` to be a multiple of 32).
        neuron: ``"lif"`` or ``"if"``; tau (> 1), v_threshold, v_reset (None: soft reset),
            decay_input: as ``multistep_neuron``.
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS`` (``cuda`` / ``cupy``: one
            thread per output spike word with the time loop inside; ``triton``: one program
            per output word of a block of 32 pixels).

    Returns:
        ``(spikes int32 [T*N, OH, OW, ceil(O/32)] packed like the input of the next layer,
        v_last float32 [N, OH, OW, O])``.
    """
    w = _check_weight(weight_packed)
    stride, padding, dilation = _check_conv(spikes_packed, w, stride, padding, dilation, groups)
    O = w.out_features
    if not isinstance(T, int) or T < 1 or spikes_packed.shape[0] % T:
        raise ValueError(f"T must be an int >= 1 dividing the batch {spikes_packed.shape[0]} (T*N), got {T!r}")
    if groups > 1 and (O // groups) % WORD_BITS:
        raise ValueError(f"groups > 1 needs O / groups to be a multiple of 32 (packed output words), got {O // groups}")
    dev = spikes_packed.device
    mul = torch.full((O,), w.scale, dtype=torch.float32, device=dev) if channel_scale is None else channel_scale
    add = torch.zeros(O, dtype=torch.float32, device=dev) if channel_shift is None else channel_shift
    _check_channel_vector("channel_scale", mul, O)
    _check_channel_vector("channel_shift", add, O)
    check_same_device("spikes_packed", spikes_packed, channel_scale=mul, channel_shift=add)
    check_choice("neuron", neuron, ("if", "lif"))
    v_threshold = check_finite("v_threshold", v_threshold)
    if v_reset is not None and not v_threshold > check_finite("v_reset", v_reset):
        raise ValueError(f"v_threshold ({v_threshold}) must be greater than v_reset ({v_reset})")
    if neuron == "lif" and not check_finite("tau", tau) > 1:
        raise ValueError(f"tau must be > 1 for LIF neurons, got {tau}")
    decay = 1.0 if neuron == "if" else 1.0 / tau  # k = 1/tau, rounded to float32 by every backend
    p = NeuronParams(v_threshold, v_reset, NEURONS[neuron], bool(decay_input))
    backend = resolve_backend(backend, "bitconv2d_lif", dev, __package__)
    return call(_bitconv2d_lif, _conv2d_lif, spikes_packed.contiguous(), w.planes, mul.contiguous(), add.contiguous(),
                stride, padding, dilation, groups, T, decay, *p.fields(), backend)


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


