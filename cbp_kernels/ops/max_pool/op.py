"""The public stem max-pooling op: validation, backend choice, the torch.library custom op (with
its fake for torch.compile).

``max_pool2d_3x3s2`` pools NCHW planes as ``aten.max_pool2d_with_indices(x, 3, 2, 1)`` does,
values and argmax bit for bit, the argmax in int16 (what ``nn.MaxPool2d`` saves);
``max_pool2d_3x3s2_backward`` is ``aten.max_pool2d_with_indices_backward`` from that int16
argmax, bit for bit, each input cell written once (ATen zero-fills the input gradient, then
scatter-adds with int64 indices). ATen's CPU
kernel loops over NCHW outputs one at a time (13 ms for SEW-ResNet-18's stem spikes
[4, 64, 112, 112], one thread); ``nn.MaxPool2d`` therefore pooled channels-last, with the
transpositions there and back (5.5 ms in all); this kernel reads the planes as they lie. CPU
only: on CUDA ATen's kernel reads NCHW directly.
"""
from __future__ import annotations

import torch

from .._backend import _available, call, kernels, resolve_backend
from ..utils import check_tensor

__all__ = ["max_pool2d_3x3s2", "max_pool2d_3x3s2_backward", "supported", "has_cpu_kernel", "MAX_PLANE"]

#: The largest plane (H * W) the int16 argmax indexes.
MAX_PLANE = 1 << 15


def _pool(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(__package__, backend).max_pool2d_3x3s2(x)


_max_pool = torch.library.custom_op("cbp_kernels::max_pool2d_3x3s2", _pool, mutates_args=())


@_max_pool.register_fake
def _(x, backend):
    shape = (x.shape[0], (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int16)


def _unpool(grad_y: torch.Tensor, argmax: torch.Tensor, height: int, width: int, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).max_pool2d_3x3s2_backward(grad_y, argmax, height, width)


_max_pool_backward = torch.library.custom_op("cbp_kernels::max_pool2d_3x3s2_backward", _unpool, mutates_args=())


@_max_pool_backward.register_fake
def _(grad_y, argmax, height, width, backend):
    return grad_y.new_empty(grad_y.shape[0], height, width)


def supported(x: torch.Tensor) -> bool:
    """Whether ``max_pool2d_3x3s2`` takes ``x``: a float32 CPU tensor ``[*, H, W]`` (at least
    3-D, non-empty), contiguous, with 1 <= H * W <= ``MAX_PLANE``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 3 and x.numel() > 0
            and x.is_contiguous() and x.shape[-2] * x.shape[-1] <= MAX_PLANE)


def has_cpu_kernel() -> bool:
    """Whether the extension holds the CPU kernel (callers with a faster fallback than the
    reference, e.g. ``nn.MaxPool2d``, use the op only then)."""
    return _available("max_pool2d_3x3s2", "cpu", "cpu", __package__) and _available(
        "max_pool2d_3x3s2_backward", "cpu", "cpu", __package__)


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


def max_pool2d_3x3s2_backward(grad_y: torch.Tensor, argmax: torch.Tensor, height: int, width: int,
                              backend: str = "auto") -> torch.Tensor:
    """The input gradient of ``max_pool2d_3x3s2``: bitwise ``aten.max_pool2d_with_indices_backward``.

    Args:
        grad_y: float32 CPU ``[*, OH, OW]``, contiguous: the outputs' gradient.
        argmax: int16 ``[*, OH, OW]``, contiguous: the forward's argmax.
        height, width: the input's H and W (OH = (H - 1) // 2 + 1, OW alike; H * W <= 2^15).
        backend: "auto", "cpu" or "reference".

    Returns:
        grad_x float32 ``[*, height, width]``: each cell the sum, in output order from 0, of the
        gradients of the outputs whose argmax it is.
    """
    check_tensor("grad_y", grad_y, dtypes=(torch.float32,), min_dim=3)
    check_tensor("argmax", argmax, dtypes=(torch.int16,), min_dim=3)
    if argmax.shape != grad_y.shape or not (grad_y.is_contiguous() and argmax.is_contiguous()):
        raise ValueError(f"grad_y and argmax must be contiguous and of one shape, got {tuple(grad_y.shape)} and "
                         f"{tuple(argmax.shape)}")
    if not (isinstance(height, int) and isinstance(width, int) and 1 <= height * width <= MAX_PLANE
            and height >= 1 and width >= 1
            and grad_y.shape[-2:] == ((height - 1) // 2 + 1, (width - 1) // 2 + 1)):
        raise ValueError(f"height / width ({height}, {width}) must be ints giving grad_y's last dims "
                         f"{tuple(grad_y.shape[-2:])}, with H * W <= {MAX_PLANE}")
    if grad_y.device.type != "cpu":
        raise ValueError(f"grad_y must be a CPU tensor, got one on {grad_y.device}")
    backend = resolve_backend(backend, "max_pool2d_3x3s2_backward", grad_y.device, __package__)
    g = grad_y.reshape(-1, *grad_y.shape[-2:])
    grad_x = call(_max_pool_backward, _unpool, g, argmax.reshape(g.shape), height, width, backend)
    return grad_x.view(*grad_y.shape[:-2], height, width)
