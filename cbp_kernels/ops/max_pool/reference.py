"""Max pooling 3x3 / stride 2 / padding 1 in plain PyTorch: the specification the kernel is
tested against. ATen's ``max_pool2d_with_indices`` on the planes, its int64 argmax (plane-local
h * W + w: the first maximum in row-major window order, the last NaN where there are NaNs)
narrowed to int16."""
from __future__ import annotations

import torch


def max_pool2d_3x3s2(x):
    """x float32 ``[B, H, W]`` -> (y ``[B, OH, OW]`` float32, argmax ``[B, OH, OW]`` int16)."""
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    return y, idx.to(torch.int16)
