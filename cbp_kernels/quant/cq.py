"""CQ training and ANN-to-SNN conversion (seed paper 003: Yan, Zhou & Wong, AAAI 2021), the
conversion peer of CBP.

1. Train an ANN whose activations are clamped to [0, 1] and quantized to T levels,
   a = floor(clamp(x, 0, 1) * T) / T, with a clipped straight-through gradient
   (1 inside [0, 1], 0 outside): ``ClampQuantize``.
2. Fuse each BatchNorm into the convolution / linear layer before it (exact): ``fuse_bn``.
3. Convert: the same weights drive integrate-and-fire neurons (no leak, reset by
   subtraction) for T steps; each layer's weights and bias are divided by max|W| and its
   threshold by the same factor, so spikes are unchanged (``to_snn``). The weights then lie
   in [-1, 1] and may be rounded to n-bit fixed point without retraining: ``fixed_point``.
The converted ``CQSpikingNet`` is a natural input for CBP's Algorithm 2 path.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import multistep_neuron

__all__ = ["ClampQuantize", "fuse_bn", "fixed_point", "to_snn", "CQSpikingNet"]


class _ClampQuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels):
        ctx.save_for_backward(x)
        return torch.floor(x.clamp(0, 1) * levels) / levels

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0) & (x <= 1)).to(grad.dtype), None


class ClampQuantize(nn.Module):
    """a = floor(clamp(x, 0, 1) * T) / T with the clipped straight-through gradient."""

    def __init__(self, timesteps: int):
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        self.timesteps = timesteps

    def forward(self, x):
        return _ClampQuantizeFn.apply(x, self.timesteps)

    def extra_repr(self):
        return f"timesteps={self.timesteps}"


def fuse_bn(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> nn.Conv2d | nn.Linear:
    """A copy of ``layer`` with the eval-mode ``bn`` after it folded in:
    W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    if layer.weight.shape[0] != bn.num_features:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the layer has {layer.weight.shape[0]} outputs")
    fused = copy.deepcopy(layer)
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(layer.weight * factor.view(-1, *([1] * (layer.weight.dim() - 1))))
        fused.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias.detach())
    return fused


def fixed_point(w: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w * 2^(bits-1)) / 2^(bits-1): n-bit fixed point of weights in [-1, 1]."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an int >= 2, got {bits!r}")
    scale = 2.0 ** (bits - 1)
    return torch.round(w * scale) / scale


class CQSpikingNet(nn.Module):
    """IF-neuron SNN converted from a CQ-trained ANN; input ``[N, ...]`` (analog, repeated
    as a constant current for T steps) or ``[T, N, ...]``; returns the last layer's
    accumulated potential / T ``[N, classes]`` (rate-decoded logits)."""

    def __init__(self, layers: list[nn.Module], thresholds: list[float], between: list[nn.Module], timesteps: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.between = nn.ModuleList(between)  # flatten / pooling applied to spikes before each layer
        self.thresholds = list(thresholds)
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0).expand(self.timesteps, *x.shape) if x.dim() in (2, 4) else x
        T, N = x_seq.shape[:2]
        for i, layer in enumerate(self.layers):
            out = layer(self.between[i](x_seq.flatten(0, 1)))
            current = out.view(T, N, *out.shape[1:])
            if i == len(self.layers) - 1:
                return current.mean(0)
            x_seq, _ = multistep_neuron(current, neuron="if", v_threshold=self.thresholds[i], v_reset=None)
        raise AssertionError("unreachable: the loop returns at the last layer")


def to_snn(ann: nn.Sequential, timesteps: int, weight_bits: int | None = None) -> CQSpikingNet:
    """Converts a CQ-trained ``ann`` (an nn.Sequential of Conv2d/Linear, optional BatchNorm,
    ClampQuantize, and shape-only modules such as Flatten / AvgPool2d) to a ``CQSpikingNet``.

    BatchNorms are fused; each weight layer is normalised by its max |W| (threshold scaled by
    the same factor, so spikes are unchanged); ``weight_bits`` rounds the normalised weights to
    fixed point."""
    modules = list(ann)
    layers, thresholds, between, pending = [], [], [], []
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if i + 1 < len(modules) and isinstance(modules[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)):
                m = fuse_bn(m, modules[i + 1])
                i += 1
            else:
                m = copy.deepcopy(m)
            norm = float(m.weight.detach().abs().max())
            if norm == 0:
                raise ValueError(f"layer {len(layers)} has all-zero weights: it cannot be normalised")
            with torch.no_grad():
                m.weight /= norm
                if weight_bits is not None:
                    m.weight.copy_(fixed_point(m.weight, weight_bits))
                if m.bias is not None:
                    m.bias /= norm
            layers.append(m)
            thresholds.append(1.0 / norm)
            between.append(nn.Sequential(*pending))
            pending = []
        elif isinstance(m, ClampQuantize):
            if m.timesteps != timesteps:
                raise ValueError(f"the ANN was trained for T={m.timesteps}, asked to convert for T={timesteps}")
        elif isinstance(m, (nn.Flatten, nn.AvgPool2d, nn.Identity)):
            pending.append(copy.deepcopy(m))
        else:
            raise ValueError(f"to_snn cannot convert a {type(m).__name__} (module {i})")
        i += 1
    if not layers:
        raise ValueError("the ANN has no Conv2d or Linear layer")
    return CQSpikingNet(layers, thresholds[:-1], between, timesteps)
