"""Max pooling 3x3 / stride 2 / padding 1 in plain PyTorch: the specification the kernel is
tested against. ATen's ``max_pool2d_with_indices`` on the planes, its int64 argmax (plane-local
h * W + w: the first maximum in row-major window order, the last NaN where there are NaNs)
narrowed to int16; the backward is ATen's ``max_pool2d_with_indices_backward`` (each output's
gradient added to its argmax cell, in output order, from 0)."""
from __future__ import annotations

import torch


def max_pool2d_3x3s2(x):
    """x float32 ``[B, H, W]`` -> (y ``[B, OH, OW]`` float32, argmax ``[B, OH, OW]`` int16)."""
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    return y, idx.to(torch.int16)


def max_pool2d_3x3s2_backward(grad_y, argmax, height: int, width: int):
    """grad_y float32 / argmax int16 ``[B, OH, OW]`` -> grad_x ``[B, height, width]`` float32."""
    stand_in = grad_y.new_zeros(()).expand(grad_y.shape[0], height, width)  # only its shape is read
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_y, stand_in, [3, 3], [2, 2], [1, 1], [1, 1], False,
                                                           argmax.to(torch.int64))
