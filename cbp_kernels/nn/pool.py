"""``MaxPool2d``: ``torch.nn.MaxPool2d`` (same arguments, values and gradients) that keeps
only the argmax for the backward, in 16 bits where the image allows, and on CPU does not run
ATen's NCHW kernel.

- Time: ATen's CPU max pooling of an NCHW tensor is a scalar loop per output (13.4 ms on
  SEW-ResNet-18's stem spikes [4, 64, 112, 112], one thread). The stems' pool (3x3, stride 2,
  padding 1) of a contiguous float32 tensor runs ``ops.max_pool2d_3x3s2`` (AVX-512, the
  planes read as they lie, the int16 argmax written directly: 1.06 ms); other pools run
  ATen's channels-last kernel, which vectorizes over the channels (2.1 ms), with the input's
  transposition there and the output's and argmax's back (6.0 ms in all). Every path takes
  the first maximum of a window in the same order, so the values and the argmax are ATen's.
- Memory: autograd's ``max_pool2d`` keeps its input and int64 indices for the backward, which
  reads neither the input's values nor 64 bits of each index: here only the argmax is kept,
  plane-local (h * W + w) in int16 when H * W <= 2^15, else int32 (the stem at batch 1: 1.6 MB
  instead of 12.8 MB of input and 6.4 MB of indices).
- The backward is ATen's (``max_pool2d_with_indices_backward``: each output's gradient added
  to its argmax, in the same order), bit for bit autograd's; for the stems' pool on CPU its
  equal ``ops.max_pool2d_3x3s2_backward`` (from the int16 argmax, no zero fill: each input
  cell gathers its windows once).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops.max_pool import has_cpu_kernel, max_pool2d_3x3s2, max_pool2d_3x3s2_backward, supported as max_pool_supported

__all__ = ["MaxPool2d", "MaxPool2dFunction"]

_STEM = ([3, 3], [2, 2], [1, 1], [1, 1], False)  # (kernel, stride, padding, dilation, ceil_mode) of ResNet stems


def _pool(x: torch.Tensor, args: tuple, argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output in x's memory format, argmax in ``_small(x)``'s type or None when not
    ``argmax``) of ``x`` [N, C, H, W]. On CPU: the stems' 3x3 / stride 2 / padding 1 pool of a
    contiguous float32 tensor through ``ops.max_pool2d_3x3s2`` (its int16 argmax), the others
    through ATen's channels-last kernel (module docstring)."""
    if args == _STEM and max_pool_supported(x) and has_cpu_kernel():
        return max_pool2d_3x3s2(x)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    src = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
    out, idx = torch.ops.aten.max_pool2d_with_indices(src, *args)
    # narrowed in the kernel's layout, then transposed in 16 bits: 0.8 ms on the stem's
    # [4, 64, 56, 56] argmax, one thread, against 1.1 ms for the transposing narrowing
    return out.contiguous(memory_format=fmt), idx.to(_small(x)).contiguous() if argmax else None


def _small(x: torch.Tensor) -> torch.dtype:
    """The argmax's saved type: int16 when the plane H * W <= 2^15, else int32 (int64 past 2^31)."""
    plane = x.shape[-2] * x.shape[-1]
    return torch.int16 if plane <= 1 << 15 else torch.int32 if plane <= 1 << 31 else torch.int64


class MaxPool2dFunction(torch.autograd.Function):
    """y = max_pool2d(x) with ``args`` = (kernel_size, stride, padding, dilation, ceil_mode),
    each pair a list of two ints; x ``[N, C, H, W]`` floating point. Saves the argmax only."""

    @staticmethod
    def forward(ctx, x, args):
        out, idx = _pool(x, args)
        ctx.save_for_backward(idx)
        ctx.conf = (x.shape, args)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        shape, args = ctx.conf
        if args == _STEM and idx.dtype == torch.int16 and max_pool_supported(grad_out) and has_cpu_kernel():
            return max_pool2d_3x3s2_backward(grad_out, idx, shape[-2], shape[-1]), None
        # the kernel reads the input's shape only: a zero-stride stand-in (no memory)
        stand_in = grad_out.new_zeros(()).expand(shape)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, stand_in, *args, idx.to(torch.int64)), None


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` (arguments, input ``[N, C, H, W]`` / ``[C, H, W]``, output as
    it) whose training saves only the argmax and whose CPU forward runs the channels-last
    kernel (module docstring). ``return_indices=True``, unbatched or integer input: torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices or x.dim() != 4 or not x.is_floating_point():
            return super().forward(x)
        pair = (lambda v: [v, v] if isinstance(v, int) else list(v))
        args = (pair(self.kernel_size), pair(self.stride if self.stride is not None else self.kernel_size),
                pair(self.padding), pair(self.dilation), bool(self.ceil_mode))
        if not (torch.is_grad_enabled() and x.requires_grad):
            return _pool(x, args, argmax=False)[0]
        return MaxPool2dFunction.apply(x, args)
