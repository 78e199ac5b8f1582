"""The public epilogue op of the integer forward (``nn.integer_forward.integer_conv2d``):
validation, backend choice, the torch.library custom op (with its fake for torch.compile).

``plane_sum_nchw(counts, planes, scale)`` turns the popcount convolution's exact counts of P bit
planes, ``counts [P*N, OH, OW, O]`` (NHWC, plane b in rows b*N..(b+1)*N), into the layer's
output ``float32(sum_b 2^b * counts_b) * s`` NCHW ``[N, O, OH, OW]``: the sum exact, the
product rounded once. The torch code (``reference``) writes NCHW through a permuted view, ATen's
strided TensorIterator at ~1/3 of copy speed (8.3 ms vs 2.6-3.7 ms for a clone at
[32, 56, 56, 64], one thread); the CPU kernel sums, scales and transposes 16 x 16 tiles in
registers in one pass. CPU only: on CUDA the reference (torch code) runs.
"""
from __future__ import annotations

import torch

from .._backend import _available, call, kernels, resolve_backend
from ..utils import check_tensor

__all__ = ["plane_sum_nchw", "has_cpu_kernel", "MAX_PLANES"]

#: The most bit planes (inputs 0..255, ``nn.integer_forward.MAX_INPUT``).
MAX_PLANES = 8


def _plane_sum(counts: torch.Tensor, planes: int, scale: torch.Tensor, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).plane_sum_nchw(counts, planes, scale)


_op = torch.library.custom_op("cbp_kernels::plane_sum_nchw", _plane_sum, mutates_args=())


@_op.register_fake
def _(counts, planes, scale, backend):
    return counts.new_empty(counts.shape[0] // planes, counts.shape[3], counts.shape[1], counts.shape[2])


def has_cpu_kernel() -> bool:
    """Whether the extension holds the CPU kernel."""
    return _available("plane_sum_nchw", "cpu", "cpu", __package__)


def plane_sum_nchw(counts: torch.Tensor, planes: int, scale: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``float32(sum_{b < planes} 2^b * counts[b*N:(b+1)*N]) * scale``, NHWC in, NCHW out.

    Args:
        counts: float32 ``[planes * N, OH, OW, O]``, contiguous: integer counts per bit plane,
            such that every sum stays below 2^24 (exact in float32).
        planes: int in 1..``MAX_PLANES``.
        scale: float32 tensor of one element, on counts' device.
        backend: "auto" (the CPU kernel on CPU tensors, the reference elsewhere), "cpu" or "reference".

    Returns:
        float32 ``[N, O, OH, OW]`` contiguous, bitwise the reference (the torch code).
    """
    check_tensor("counts", counts, dtypes=(torch.float32,), min_dim=4)
    check_tensor("scale", scale, dtypes=(torch.float32,))
    if counts.dim() != 4 or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous [P*N, OH, OW, O] tensor, got shape {tuple(counts.shape)}"
                         + ("" if counts.is_contiguous() else " (not contiguous)"))
    if not (isinstance(planes, int) and not isinstance(planes, bool) and 1 <= planes <= MAX_PLANES
            and counts.shape[0] % planes == 0):
        raise ValueError(f"planes must be an int in 1..{MAX_PLANES} dividing counts.shape[0] = {counts.shape[0]}, "
                         f"got {planes!r}")
    if scale.numel() != 1 or scale.device != counts.device:
        raise ValueError(f"scale must be one element on counts' device {counts.device}, got shape "
                         f"{tuple(scale.shape)} on {scale.device}")
    if backend == "auto" and counts.device.type != "cpu":
        backend = "reference"  # a CPU kernel only: the torch code elsewhere, without resolve_backend's warning
    backend = resolve_backend(backend, "plane_sum_nchw", counts.device, __package__)
    return call(_op, _plane_sum, counts, planes, scale, backend)
