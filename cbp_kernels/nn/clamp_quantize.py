"""CQ's activation layer (seed paper 003): clamp to [0, 1] and quantize to T levels, the
ANN stand-in of an IF neuron's spike count over T steps."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClampQuantize"]


class _ClampQuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels):
        ctx.save_for_backward(x)
        return torch.floor(x.clamp(0, 1) * levels) / levels

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return nn.functional.hardtanh(grad) * ((x >= 0) & (x <= 1)).to(grad.dtype), None


class ClampQuantize(nn.Module):
    """a = floor(clamp(x, 0, 1) * T) / T; gradient hardtanh(dL/da) inside [0, 1], 0 outside, as
    the CQ authors' ``Clamp_q`` / ``Quantization.backward`` (zhoujuncc1/shenjingcat@068f967,
    src/cq.py); any shape, float dtypes."""

    def __init__(self, timesteps: int):
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        self.timesteps = timesteps

    def forward(self, x):
        return _ClampQuantizeFn.apply(x, self.timesteps)

    def extra_repr(self):
        return f"timesteps={self.timesteps}"
