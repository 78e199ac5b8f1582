"""The public batch-norm statistics op: validation, backend choice, the torch.library custom op
(with its fake for torch.compile).

``batch_norm_stats`` returns what ``aten.native_batch_norm(x, ..., training=True)`` returns as
its second and third outputs on the CPU (the batch mean and invstd), bit for bit, and updates
the running statistics as that op does; about 3x faster on one thread (ATen sums each channel
in one scalar float64 chain; the kernel runs 8 channels' chains side by side, each in ATen's
order). CPU only: CUDA's batch norm has other arithmetic, and callers keep ATen's op there.
"""
from __future__ import annotations

import torch

from .._backend import call, kernels, resolve_backend
from ..utils import check_finite, check_tensor

__all__ = ["batch_norm_stats", "supported"]


@torch.library.custom_op("cbp_kernels::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def _batch_norm_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      momentum: float, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(__package__, backend).batch_norm_stats(x, running_mean, running_var, momentum, eps)


def _stats(x, running_mean, running_var, momentum, eps, backend):
    return kernels(__package__, backend).batch_norm_stats(x, running_mean, running_var, momentum, eps)


@_batch_norm_stats.register_fake
def _(x, *args):
    return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def supported(x: torch.Tensor, *stats: torch.Tensor | None) -> bool:
    """Whether ``batch_norm_stats`` reproduces native_batch_norm for x and these [C] tensors:
    x a non-empty float32 CPU tensor ``[N, C, *]`` in contiguous (NCHW) layout and not also
    channels-last contiguous (ATen reads an [N, C, 1, 1] tensor as channels-last, with a
    thread-count-dependent sum), the others float32 or None."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0
            and x.is_contiguous() and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            and not (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
            and all(t is None or t.dtype == torch.float32 for t in stats))


def batch_norm_stats(x: torch.Tensor, running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                     momentum: float = 0.1, eps: float = 1e-5, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and invstd of x, as a training-mode BatchNorm computes them on the CPU.

    Args:
        x: ``[N, C, *]`` float32 CPU tensor, contiguous (see ``supported``).
        running_mean, running_var: ``[C]`` float32 contiguous, or None; updated in place with
            ``momentum`` (the variance unbiased), exactly as ``aten.native_batch_norm``.
        momentum, eps: as ``nn.BatchNorm2d``'s (momentum a float here).
        backend: "auto", "cpu" or "reference".

    Returns:
        (mean, invstd), ``[C]`` float32 each, bitwise ``aten.native_batch_norm(x, w, b,
        running_mean, running_var, True, momentum, eps)[1:]``.
    """
    check_tensor("x", x, dtypes=(torch.float32,), min_dim=2)
    if not supported(x):
        raise ValueError(f"x must be a non-empty contiguous (not channels-last) CPU tensor, got shape "
                         f"{tuple(x.shape)} on {x.device}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            check_tensor(name, t, dtypes=(torch.float32,))
            if t.shape != (x.shape[1],) or not t.is_contiguous() or t.device != x.device:
                raise ValueError(f"{name} must be a contiguous [{x.shape[1]}] tensor on {x.device}, "
                                 f"got shape {tuple(t.shape)} on {t.device}")
    momentum, eps = check_finite("momentum", momentum), check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    backend = resolve_backend(backend, "batch_norm_stats", x.device, __package__)
    return call(_batch_norm_stats, _stats, x, running_mean, running_var, momentum, eps, backend)
