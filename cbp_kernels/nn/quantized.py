"""Quantized layers with a straight-through estimator: ``QuantConv2d`` and ``QuantLinear``.

They subclass ``nn.Conv2d`` / ``nn.Linear`` (``isinstance`` and state-dict keys unchanged)
and compute with Q(W) = ``cbp_kernels.ops.quantize(W, levels, weight_scale)``: each weight
replaced by the level s*q selected by thresholds at the midpoints, with a straight-through
gradient to the real-valued W, which is kept and trained. Two buffers are added:
``levels`` (unscaled level set, 1-D float32) and ``weight_scale`` (0-dim float32,
s = mean(|W|) of the weights when quantization starts; fixed, no gradient, in no optimizer).

Exact integer forward: when the model declares the layer's input as integers in [0, k]
(attribute ``input_max = k``: spikes 1, SEW ADD sums more; None for real-valued input such
as images) and the levels are binary / ternary, the forward is ``float32(count) * s (+ b)``
with the exact integer count from the popcount convolution (``nn.integer_forward``), the
backward the float layer's, on the layers where that forward is the faster one
(``integer_forward = True``, a rule on the weight's shape: ``integer_forward.prefers_integer``;
``"always"``: wherever it applies); ``integer_forward = False``
(``CBPConfig(integer_forward=False)``) keeps the float32 forward F.conv2d(x, Q(W)). In
float32 only (autocast: the float path).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import quantize
from ..ops.constraint.op import quantize_table, quantize_with_table
from ..ops.utils import check_tensor
from .integer_forward import IntegerLinearFunction, integer_conv2d, integer_linear, integer_spec, popcount_name
from .lifconv import SpikeConv2dFunction

__all__ = ["QuantConv2d", "QuantLinear", "QuantizedLayer", "quantized_class", "twin_of", "float_twin"]


class QuantizedLayer:
    """Mixin of the quantized layers: the buffers, ``quantized_weight()`` and ``from_float``."""

    levels: torch.Tensor
    weight_scale: torch.Tensor
    weight: nn.Parameter
    #: the input holds integers in [0, input_max] (declared by the model; None: real-valued)
    input_max: int | None = None
    #: run the exact integer forward: True where it is faster, "always" where it applies, False never
    integer_forward: bool | str = True
    #: "binary" / "ternary" when the levels are a popcount set, else None (set with the levels)
    popcount_levels: str | None = None

    def _init_quant(self, levels: torch.Tensor, scale: torch.Tensor) -> None:
        device = self.weight.device
        for name in ("levels", "weight_scale"):  # a float layer's plain attribute (LIFConv2d.weight_scale = None)
            self.__dict__.pop(name, None)
        self.register_buffer("levels", levels.detach().to(device=device, dtype=torch.float32).clone())
        self.register_buffer("weight_scale", scale.detach().to(device=device, dtype=torch.float32).reshape(()).clone())
        self.quant_backend = "auto"
        self.popcount_levels = popcount_name(self.levels)

    @classmethod
    def _family(cls) -> tuple[type, type]:
        return QuantConv2d, QuantLinear

    def _quant_state(self) -> tuple[str, ...]:
        """Names of the parameters / buffers the quantizer added to the float layer."""
        return ("levels", "weight_scale")

    def quantized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Q(W) of ``weight`` (default ``self.weight``), same shape and dtype, with a
        straight-through gradient to it."""
        weight = self.weight if weight is None else weight
        if torch.compiler.is_compiling():
            return quantize(weight, self.levels, self.weight_scale, backend=self.quant_backend)
        check_tensor("w", weight)
        return quantize_with_table(weight, *self._quant_table(weight))

    def _quant_table(self, weight: torch.Tensor) -> tuple[torch.Tensor, str]:
        """``ops.quantize_table`` of the buffers for ``weight``'s dtype and device, made (and
        checked) once, again only when a buffer is replaced or changed in place (its
        ``_version``: ``load_state_dict``, ``copy_``) or the backend, dtype or device change.
        The cache holds the buffers themselves, so identity cannot be a reused address."""
        lv, s = self.levels, self.weight_scale
        state = (lv._version, s._version, weight.dtype, weight.device, self.quant_backend)
        cached = self.__dict__.get("_quant_table_cache")
        if cached is None or cached[0] is not lv or cached[1] is not s or cached[2] != state:
            table, backend = quantize_table(lv, s, weight.dtype, weight.device, backend=self.quant_backend)
            cached = self.__dict__["_quant_table_cache"] = (lv, s, state, table, backend)
        return cached[3], cached[4]

    @classmethod
    def from_float(cls, layer: nn.Module, levels: torch.Tensor, scale: torch.Tensor | None = None):
        """The quantized twin of ``layer``, sharing its Parameter objects (optimizers and DDP
        that hold them keep working). ``levels``: sorted 1-D unscaled level set; ``scale``
        (0-dim): default mean(|W|) of ``layer.weight`` now. A subclass of nn.Conv2d / nn.Linear
        (e.g. SpikingJelly's ``layer.Conv2d`` with ``step_mode``) keeps its class behaviour:
        the result's class derives from both."""
        q = twin_of(layer, cls)
        with torch.no_grad():
            s = layer.weight.abs().mean() if scale is None else scale
        q._init_quant(levels, s)
        return q


def twin_of(layer: nn.Module, cls: type) -> nn.Module:
    """An instance of ``layer``'s quantized class in the family of ``cls`` (its
    ``_family()``: the (Conv2d, Linear) classes of one quantizer) holding ``layer``'s state
    and Parameter objects; the caller then sets up the quantizer's own state."""
    conv_cls, linear_cls = cls._family()
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or isinstance(layer, QuantizedLayer):
        raise TypeError(f"from_float needs an unquantized nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    if not issubclass(conv_cls if isinstance(layer, nn.Conv2d) else linear_cls, cls):
        raise TypeError(f"{cls.__name__}.from_float cannot convert a {type(layer).__name__}")
    # A copy of the instance state (not a constructor call): keeps every attribute of
    # subclasses whose constructor signature is unknown here (e.g. ``step_mode``); the
    # containers are copied so that the two modules do not share their dicts.
    qcls = quantized_class(type(layer), conv_cls, linear_cls)
    q = qcls.__new__(qcls)
    q.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in layer.__dict__.items()})
    return q


_CLASSES: dict[tuple[type, type], type] = {}


def float_twin(layer: QuantizedLayer) -> nn.Module:
    """The float layer (nn.Conv2d / nn.Linear or the subclass it was made from) holding the
    quantized ``layer``'s Parameter objects and state, without the quantizer's own
    parameters and buffers (levels, scale, ...)."""
    conv_cls, linear_cls = type(layer)._family()
    qcls = type(layer)
    fcls = {conv_cls: nn.Conv2d, linear_cls: nn.Linear}.get(qcls) or qcls.__bases__[1]
    f = fcls.__new__(fcls)
    f.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in layer.__dict__.items()})
    own = set(layer._quant_state())
    for container in ("_parameters", "_buffers"):
        setattr(f, container, {k: v for k, v in getattr(layer, container).items() if k not in own})
    return f


def quantized_class(float_cls: type, conv_cls: type | None = None, linear_cls: type | None = None) -> type:
    """The quantized class for ``float_cls`` in a family (default CBP's: nn.Conv2d ->
    QuantConv2d, nn.Linear -> QuantLinear; a subclass X of either -> a class deriving from
    the quantized one and X)."""
    conv_cls, linear_cls = conv_cls or QuantConv2d, linear_cls or QuantLinear
    if float_cls is nn.Conv2d or float_cls is conv_cls:
        return conv_cls
    if float_cls is nn.Linear or float_cls is linear_cls:
        return linear_cls
    base = conv_cls if issubclass(float_cls, nn.Conv2d) else linear_cls
    if (base, float_cls) not in _CLASSES:
        name = f"{base.__name__.removesuffix('Conv2d').removesuffix('Linear')}{float_cls.__name__}"
        _CLASSES[base, float_cls] = type(name, (base, float_cls), {"__module__": base.__module__})
    return _CLASSES[base, float_cls]


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with Q(W). Input/output as nn.Conv2d: ``[N, C_in, H, W]`` ->
    ``[N, C_out, H', W']``. Build it with ``QuantConv2d.from_float(conv, levels)`` or as
    nn.Conv2d plus ``levels=`` (the scale is then mean(|W|) of the initial weights)."""

    def __init__(self, *args, levels: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self._init_quant(levels, self.weight.abs().mean())

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        wq = self.quantized_weight(weight)
        integer = None
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            integer = integer_spec(self, input, wq, self.weight_scale, 4)
        if integer is None:
            return super()._conv_forward(input, wq, bias)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        if not torch.is_grad_enabled():
            return integer_conv2d(input, wq, bias, *conv, integer)
        return SpikeConv2dFunction.apply(input, wq, bias, *conv, None, integer)


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` computing with Q(W): ``[*, in_features]`` -> ``[*, out_features]``."""

    def __init__(self, *args, levels: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self._init_quant(levels, self.weight.abs().mean())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        wq = self.quantized_weight()
        integer = integer_spec(self, input, wq, self.weight_scale, input.dim()) if input.dim() >= 1 else None
        if integer is None:
            return F.linear(input, wq, self.bias)
        if not torch.is_grad_enabled():
            return integer_linear(input, wq, self.bias, integer)
        return IntegerLinearFunction.apply(input, wq, self.bias, integer)
