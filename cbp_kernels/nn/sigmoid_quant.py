"""Layers quantized with the differentiable sigmoid-sum function (seed paper 001): during
training the weight used is ``sigmoid_quantize(W, alpha, beta, levels, T)``; in eval mode the
hard steps (its T -> infinity limit). alpha and beta are learned per layer, starting at
beta = 1.25 / max|W| and alpha = 1 / beta; the temperature T is set by the trainer."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.sigmoid_quant import level_table, sigmoid_hard_quantize, sigmoid_quantize

__all__ = ["SigmoidQuantConv2d", "SigmoidQuantLinear"]


class _SigmoidQuantMixin:
    def _init_quant(self, levels) -> None:
        level_table(levels)  # validates the level set
        self._levels = tuple(float(q) for q in levels)  # a host copy: no device sync per forward
        self.register_buffer("levels", torch.tensor(self._levels))
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(1.0))
        self.reset_scale()
        self.temperature = 1.0

    def reset_scale(self) -> None:
        """beta = 1.25 / max|W|, alpha = 1 / beta (the paper's start) from the current weights."""
        beta = 1.25 / float(self.weight.detach().abs().max().clamp_min(1e-12))
        with torch.no_grad():
            self.alpha.fill_(1.0 / beta)
            self.beta.fill_(beta)

    def quantized_weight(self) -> torch.Tensor:
        levels = self._levels
        if self.training:
            return sigmoid_quantize(self.weight, self.alpha, self.beta, levels, self.temperature)
        return sigmoid_hard_quantize(self.weight, self.alpha.detach(), self.beta.detach(), levels)

    @classmethod
    def from_float(cls, layer, levels):
        """The same layer (weights, bias, hyper-parameters) quantized to ``levels``."""
        if isinstance(layer, nn.Conv2d):
            new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                      bias=layer.bias is not None, levels=levels)
        else:
            new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, levels=levels)
        new.to(layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.reset_scale()
        return new


class SigmoidQuantConv2d(_SigmoidQuantMixin, nn.Conv2d):
    """nn.Conv2d whose weight is sigmoid-sum quantized (see module docstring)."""

    def __init__(self, *args, levels=(-1.0, 1.0), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(list(levels))

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class SigmoidQuantLinear(_SigmoidQuantMixin, nn.Linear):
    """nn.Linear whose weight is sigmoid-sum quantized (see module docstring)."""

    def __init__(self, *args, levels=(-1.0, 1.0), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(list(levels))

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)
