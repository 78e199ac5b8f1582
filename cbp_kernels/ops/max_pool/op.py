"""The public stem max-pooling op: validation, backend choice, the torch.library custom op (with
its fake for torch.compile).

``max_pool2d_3x3s2`` pools NCHW planes as ``aten.max_pool2d_with_indices(x, 3, 2, 1)`` does,
values and argmax bit for bit, the argmax in int16 (what ``nn.MaxPool2d`` saves). ATen's CPU
kernel loops over NCHW outputs one at a time (13 ms for SEW-ResNet-18's stem spikes
[4, 64, 112, 112], one thread); ``nn.MaxPool2d`` therefore pooled channels-last, with the
transpositions there and back (5.5 ms in all); this kernel reads the planes as they lie. CPU
only: on CUDA ATen's kernel reads NCHW directly.
"""
from __future__ import annotations

import torch

from .._backend import _available, call, kernels, resolve_backend
from ..utils import check_tensor

__all__ = ["max_pool2d_3x3s2", "supported", "has_cpu_kernel", "MAX_PLANE"]

#: The largest plane (H * W) the int16 argmax indexes.
MAX_PLANE = 1 << 15


def _pool(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(__package__, backend).max_pool2d_3x3s2(x)


_max_pool = torch.library.custom_op("cbp_kernels::max_pool2d_3x3s2", _pool, mutates_args=())


@_max_pool.register_fake
def _(x, backend):
    shape = (x.shape[0], (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int16)


def supported(x: torch.Tensor) -> bool:
    """Whether ``max_pool2d_3x3s2`` takes ``x``: a float32 CPU tensor ``[*, H, W]`` (at least
    3-D, non-empty), contiguous, with 1 <= H * W <= ``MAX_PLANE``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 3 and x.numel() > 0
            and x.is_contiguous() and x.shape[-2] * x.shape[-1] <= MAX_PLANE)


def has_cpu_kernel() -> bool:
    """Whether the extension holds the CPU kernel (callers with a faster fallback than the
    reference, e.g. ``nn.MaxPool2d``, use the op only then)."""
    return _available("max_pool2d_3x3s2", "cpu", "cpu", __package__)


def max_pool2d_3x3s2(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling with kernel 3, stride 2, padding 1 (dilation 1, floor mode) over the last two
    dimensions, as ``torch.ops.aten.max_pool2d_with_indices``.

    Args:
        x: float32 CPU tensor ``[*, H, W]`` (e.g. NCHW), contiguous, H * W <= 2^15.
        backend: "auto", "cpu" or "reference".

    Returns:
        (y ``[*, OH, OW]`` float32, argmax ``[*, OH, OW]`` int16), OH = (H - 1) // 2 + 1 and
        OW alike; argmax the plane-local index h * W + w of each output's maximum (the first in
        row-major window order; the last NaN where the window holds NaNs), bitwise ATen's.
    """
    check_tensor("x", x, dtypes=(torch.float32,), min_dim=3)
    if not supported(x):
        raise ValueError(f"x must be a non-empty contiguous CPU tensor [*, H, W] with H * W <= {MAX_PLANE}, got "
                         f"shape {tuple(x.shape)} on {x.device}")
    backend = resolve_backend(backend, "max_pool2d_3x3s2", x.device, __package__)
    planes = x.reshape(-1, *x.shape[-2:])
    y, idx = call(_max_pool, _pool, planes, backend)
    return y.view(*x.shape[:-2], *y.shape[1:]), idx.view(*x.shape[:-2], *idx.shape[1:])
