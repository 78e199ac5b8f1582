"""The `cupy` backend: csrc/cuda/sigmoid_quant.cuh compiled by CuPy's NVRTC (for an
extension built without CUDA); same kernels and launch geometry as the `cuda` backend.
Same signature as ``reference``; CUDA tensors only."""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import dtype_suffix, launch
from .reference import backward_buffers

THREADS = 256  # the block size the kernels' shared-memory reduction assumes


def _common(w, alpha, beta, gaps, mids, offset, temperature):
    return (alpha.contiguous(), beta.contiguous(), np.float32(temperature), gaps.float().contiguous(),
            mids.float().contiguous(), np.int32(gaps.numel()), np.float32(offset))


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float):
    w = w.contiguous()
    y = torch.empty_like(w)
    grid = (w.numel() + THREADS - 1) // THREADS
    launch("sigmoid_quant", f"sigmoid_quant_forward_{dtype_suffix(w.dtype)}", w.device, grid, THREADS,
           (w, y, np.int64(w.numel())) + _common(w, alpha, beta, gaps, mids, offset, temperature))
    return y


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    grad_y, w, grad_w, grad_a, grad_b = backward_buffers(grad_y, w)
    grid = (w.numel() + THREADS - 1) // THREADS
    launch("sigmoid_quant", f"sigmoid_quant_backward_{dtype_suffix(w.dtype)}", w.device, grid, THREADS,
           (grad_y, w, grad_w, grad_a, grad_b, np.int64(w.numel())) + _common(w, alpha, beta, gaps, mids, offset,
                                                                                temperature))
    return grad_w, grad_a, grad_b
