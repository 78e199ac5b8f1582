"""Quantized layers with a straight-through estimator: ``QuantConv2d`` and ``QuantLinear``.

They subclass ``nn.Conv2d`` / ``nn.Linear`` (``isinstance`` and state-dict keys unchanged)
and compute with Q(W) = ``cbp_kernels.ops.quantize(W, levels, weight_scale)``: each weight
replaced by the level s*q selected by thresholds at the midpoints, with a straight-through
gradient to the real-valued W, which is kept and trained. Two buffers are added:
``levels`` (unscaled level set, 1-D float32) and ``weight_scale`` (0-dim float32,
s = mean(|W|) of the weights when quantization starts; fixed, no gradient, in no optimizer).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import quantize

__all__ = ["QuantConv2d", "QuantLinear", "QuantizedLayer", "quantized_class"]


class QuantizedLayer:
    """Mixin of the quantized layers: the buffers, ``quantized_weight()`` and ``from_float``."""

    levels: torch.Tensor
    weight_scale: torch.Tensor
    weight: nn.Parameter

    def _init_quant(self, levels: torch.Tensor, scale: torch.Tensor) -> None:
        device = self.weight.device
        self.register_buffer("levels", levels.detach().to(device=device, dtype=torch.float32).clone())
        self.register_buffer("weight_scale", scale.detach().to(device=device, dtype=torch.float32).reshape(()).clone())
        self.quant_backend = "auto"

    def quantized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Q(W) of ``weight`` (default ``self.weight``), same shape and dtype, with a
        straight-through gradient to it."""
        weight = self.weight if weight is None else weight
        return quantize(weight, self.levels, self.weight_scale, backend=self.quant_backend)

    @classmethod
    def from_float(cls, layer: nn.Module, levels: torch.Tensor, scale: torch.Tensor | None = None):
        """The quantized twin of ``layer``, sharing its Parameter objects (optimizers and DDP
        that hold them keep working). ``levels``: sorted 1-D unscaled level set; ``scale``
        (0-dim): default mean(|W|) of ``layer.weight`` now. A subclass of nn.Conv2d / nn.Linear
        (e.g. SpikingJelly's ``layer.Conv2d`` with ``step_mode``) keeps its class behaviour:
        the result's class derives from both."""
        base = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or isinstance(layer, QuantizedLayer):
            raise TypeError(f"from_float needs an unquantized nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if not issubclass(base, cls):
            raise TypeError(f"{cls.__name__}.from_float cannot convert a {type(layer).__name__}")
        # A copy of the instance state (not a constructor call): keeps every attribute of
        # subclasses whose constructor signature is unknown here (e.g. ``step_mode``); the
        # containers are copied so that the two modules do not share their dicts.
        qcls = quantized_class(type(layer))
        q = qcls.__new__(qcls)
        state = layer.__dict__.items()
        q.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in state})
        with torch.no_grad():
            s = layer.weight.abs().mean() if scale is None else scale
        q._init_quant(levels, s)
        return q


_CLASSES: dict[type, type] = {}


def quantized_class(float_cls: type) -> type:
    """The quantized class for ``float_cls`` (nn.Conv2d -> QuantConv2d, nn.Linear ->
    QuantLinear, a subclass X of either -> a class deriving from the quantized one and X)."""
    if float_cls is nn.Conv2d or float_cls is QuantConv2d:
        return QuantConv2d
    if float_cls is nn.Linear or float_cls is QuantLinear:
        return QuantLinear
    if float_cls not in _CLASSES:
        base = QuantConv2d if issubclass(float_cls, nn.Conv2d) else QuantLinear
        _CLASSES[float_cls] = type(f"Quant{float_cls.__name__}", (base, float_cls), {"__module__": __name__})
    return _CLASSES[float_cls]


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with Q(W). Input/output as nn.Conv2d: ``[N, C_in, H, W]`` ->
    ``[N, C_out, H', W']``. Build it with ``QuantConv2d.from_float(conv, levels)`` or as
    nn.Conv2d plus ``levels=`` (the scale is then mean(|W|) of the initial weights)."""

    def __init__(self, *args, levels: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self._init_quant(levels, self.weight.abs().mean())

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(input, self.quantized_weight(weight), bias)


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` computing with Q(W): ``[*, in_features]`` -> ``[*, out_features]``."""

    def __init__(self, *args, levels: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self._init_quant(levels, self.weight.abs().mean())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.quantized_weight(), self.bias)
