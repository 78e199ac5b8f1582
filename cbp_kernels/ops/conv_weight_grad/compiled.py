"""The `cpu` backend: the extension's kernel (csrc/cpu/conv_weight_grad.cpp); CPU only (see
``op.py``). Same signature as ``reference``."""
from __future__ import annotations

import torch


def conv_weight_grad(grad_y, x, kernel_size, stride, padding):
    return torch.ops.cbp_kernels_ext.conv_weight_grad(grad_y, x, kernel_size, stride, padding)
