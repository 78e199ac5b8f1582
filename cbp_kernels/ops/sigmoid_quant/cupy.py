"""The `cupy` backend: csrc/cuda/sigmoid_quant.cuh compiled by CuPy's NVRTC (for an
extension built without CUDA); same kernels, launch geometry and float64 block partials as the
`cuda` backend. Same signature as ``reference``; CUDA tensors only."""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import dtype_suffix, launch

THREADS = 256  # kSigmoidQuantThreads in csrc/cuda/sigmoid_quant.cuh (the backward's tree assumes it)


def _common(alpha, beta, gaps, mids, offset, temperature):
    """The kernels' trailing arguments: the parameters and the level table as float32 contiguous."""
    return (alpha.float().contiguous(), beta.float().contiguous(), np.float32(temperature), gaps.float().contiguous(),
            mids.float().contiguous(), np.int32(gaps.numel()), np.float32(offset))


def _blocks(n: int) -> int:
    return (n + THREADS - 1) // THREADS


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float):
    w = w.contiguous()
    y = torch.empty_like(w)
    if w.numel():
        launch("sigmoid_quant", f"sigmoid_quant_forward_{dtype_suffix(w.dtype)}", w.device, _blocks(w.numel()),
               THREADS, (w, y, np.int64(w.numel())) + _common(alpha, beta, gaps, mids, offset, temperature))
    return y


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    grad_y, w = grad_y.contiguous(), w.contiguous()
    grad_w = torch.empty_like(w)
    # per block: (sum of alpha's terms, sum of beta's terms) in float64, added up here
    partial = torch.zeros(_blocks(w.numel()), 2, dtype=torch.float64, device=w.device)
    if w.numel():
        launch("sigmoid_quant", f"sigmoid_quant_backward_{dtype_suffix(w.dtype)}", w.device, _blocks(w.numel()),
               THREADS, (grad_y, w, grad_w, partial, np.int64(w.numel()))
               + _common(alpha, beta, gaps, mids, offset, temperature))
    grad_alpha, grad_beta = partial.sum(0).to(alpha.dtype).unbind()
    return grad_w, grad_alpha, grad_beta
