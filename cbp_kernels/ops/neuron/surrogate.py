"""Surrogate derivatives sg'(x) of the Heaviside spike, x = H - V_th, in plain PyTorch.

The same formulas as SpikingJelly 2.0 (``spikingjelly.activation_based.surrogate``) and as
csrc/common/neuron_math.h:
- ``atan``:                alpha/2 / (1 + (pi/2 * alpha * x)^2)        (ATan, alpha=2)
- ``sigmoid``:             alpha * sig(alpha x) * (1 - sig(alpha x))    (Sigmoid, alpha=4)
- ``rectangle``:           alpha * 1{|x| < 0.5/alpha}                   (Rect, alpha=1)
- ``triangle``:            alpha * max(0, 1 - |x|)                      (alpha=1)
- ``piecewise_quadratic``: max(0, alpha - alpha^2 |x|)                  (PiecewiseQuadratic, alpha=1)
"""
from __future__ import annotations

import math

import torch

from .params import SURROGATES


def surrogate_grad(x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
    if surrogate == SURROGATES["atan"]:
        z = x * (math.pi / 2 * alpha)
        return (alpha / 2) / (1 + z * z)
    if surrogate == SURROGATES["sigmoid"]:
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1 - s)
    if surrogate == SURROGATES["rectangle"]:
        return (x.abs() < 0.5 / alpha).to(x.dtype) * alpha
    if surrogate == SURROGATES["triangle"]:
        return alpha * (1 - x.abs()).clamp_min(0)
    return (alpha - alpha * alpha * x.abs()).clamp_min(0)


class SpikeFn(torch.autograd.Function):
    """S = (x >= 0) forward, dS/dx = sg'(x) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike):
        (x,) = ctx.saved_tensors
        return grad_spike * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None
