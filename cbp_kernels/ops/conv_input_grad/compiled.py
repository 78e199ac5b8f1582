"""The `cpu` backend: the extension's kernel (csrc/cpu/conv_input_grad.cpp); CPU only (see
``op.py``). Same signature as ``reference``."""
from __future__ import annotations

import torch


def conv_input_grad(grad_y, weight, input_size: list[int], stride: list[int], padding: list[int], alpha: float,
                    weight_sign: bool = False):
    return torch.ops.cbp_kernels_ext.conv_input_grad(grad_y, weight, input_size, stride, padding, alpha, weight_sign)


def conv2d_integer_input(x, weight, padding: list[int]):
    return torch.ops.cbp_kernels_ext.conv2d_integer_input(x, weight, padding)
