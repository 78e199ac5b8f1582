"""Layers quantized with the differentiable sigmoid-sum function (seed paper 001): in training
mode the weight used is ``sigmoid_quantize(W, alpha, beta, levels, T)``; in eval mode the hard
steps (its T -> infinity limit), i.e. alpha * q for a level q. alpha and beta are learned per
layer, starting at beta = 5p / (4q) (p = max|level|, q = max|W|: Quantization Networks, Yang et
al., CVPR 2019, section 3.3) and alpha = 1 / beta; the temperature T (attribute
``temperature``) is set by the trainer (``cbp_kernels.quant.SigmoidQuantizer``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sigmoid_quant import level_table, sigmoid_hard_quantize, sigmoid_quantize
from .quantized import QuantizedLayer

__all__ = ["SigmoidQuantized", "SigmoidQuantConv2d", "SigmoidQuantLinear"]


class SigmoidQuantized(QuantizedLayer):
    """Mixin: buffers ``levels``, parameters ``alpha`` and ``beta``, ``quantized_weight()``."""

    @classmethod
    def _family(cls) -> tuple[type, type]:
        return SigmoidQuantConv2d, SigmoidQuantLinear

    def _quant_state(self) -> tuple[str, ...]:
        return ("levels", "biases", "alpha", "beta")

    def _init_quant(self, levels, scale=None) -> None:
        """``scale`` is unused: the sigmoid sum learns its own (alpha)."""
        levels = torch.as_tensor(levels, dtype=torch.float32).flatten()
        level_table(levels)  # validates: sorted, distinct, symmetric
        device = self.weight.device
        self._levels = tuple(levels.tolist())  # a host copy: no device sync per forward
        self.register_buffer("levels", levels.to(device))
        self.register_buffer("biases", None)  # the sigmoids' b_i; None: the level midpoints
        self.alpha = nn.Parameter(torch.ones((), device=device))
        self.beta = nn.Parameter(torch.ones((), device=device))
        self.temperature = 1.0
        self.quant_backend = "auto"
        self.reset_scale()

    @torch.no_grad()
    def reset_scale(self) -> None:
        """beta = 5p / (4q), p = max|level|, q = max|W| (the paper's start: beta * W spans the
        levels and a quarter more), and alpha = 1 / beta, from the weights now."""
        p = max(abs(v) for v in self._levels)
        beta = 5.0 * p / (4.0 * float(self.weight.abs().max().clamp_min(1e-12)))
        self.alpha.fill_(1.0 / beta)
        self.beta.fill_(beta)

    def quantized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if self.training:
            return sigmoid_quantize(weight, self.alpha, self.beta, self._levels, self.temperature, biases=self.biases,
                                    backend=self.quant_backend)
        return sigmoid_hard_quantize(weight, self.alpha.detach(), self.beta.detach(), self._levels, self.biases)


class SigmoidQuantConv2d(SigmoidQuantized, nn.Conv2d):
    """nn.Conv2d computing with the sigmoid-quantized weight; ``from_float(conv, levels)``."""

    def __init__(self, *args, levels=(-1.0, 1.0), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(levels)

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, self.quantized_weight(weight), bias)


class SigmoidQuantLinear(SigmoidQuantized, nn.Linear):
    """nn.Linear computing with the sigmoid-quantized weight; ``from_float(linear, levels)``."""

    def __init__(self, *args, levels=(-1.0, 1.0), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(levels)

    def forward(self, input):
        return F.linear(input, self.quantized_weight(), self.bias)
