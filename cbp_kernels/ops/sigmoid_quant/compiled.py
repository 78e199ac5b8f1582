"""The `cpu` and `cuda` backends: the extension's kernels (csrc/cpu/sigmoid_quant.cpp,
csrc/cuda/sigmoid_quant.cu) chosen by the dispatcher from the device. Same signature as
``reference``."""
from __future__ import annotations

import torch


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float):
    return torch.ops.cbp_kernels_ext.sigmoid_quant_forward(w, alpha, beta, gaps, mids, offset, temperature)


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    return tuple(torch.ops.cbp_kernels_ext.sigmoid_quant_backward(grad_y, w, alpha, beta, gaps, mids, offset, temperature))
