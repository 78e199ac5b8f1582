"""The `cpu` backend: the extension's kernel (csrc/cpu/max_pool.cpp); CPU only (see ``op.py``).
Same signature as ``reference``."""
from __future__ import annotations

import torch


def max_pool2d_3x3s2(x):
    return tuple(torch.ops.cbp_kernels_ext.max_pool2d_3x3s2(x))


def max_pool2d_3x3s2_backward(grad_y, argmax, height: int, width: int):
    return torch.ops.cbp_kernels_ext.max_pool2d_3x3s2_backward(grad_y, argmax, height, width)
