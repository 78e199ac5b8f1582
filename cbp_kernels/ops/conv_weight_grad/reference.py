"""The convolution's weight gradient in plain PyTorch: the specification the kernel is tested
against. ATen's ``convolution_backward`` in float32 with the mask selecting the weight
gradient alone (groups 1, dilation 1)."""
from __future__ import annotations

import torch


def conv_weight_grad(grad_y, x, kernel_size, stride, padding):
    """grad_y ``[N, O, OH, OW]``, x ``[N, C, H, W]`` (uint8: as grad_y's dtype) -> grad_w
    ``[O, C, KH, KW]`` (grad_y's dtype)."""
    x = x.to(grad_y.dtype)
    stand_in = x.new_zeros(()).expand(grad_y.shape[1], x.shape[1], *kernel_size)  # only its shape is read
    return torch.ops.aten.convolution_backward(grad_y, x, stand_in, None, list(stride), list(padding), [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]
