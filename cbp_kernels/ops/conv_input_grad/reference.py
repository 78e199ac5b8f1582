"""The input gradient of a convolution in plain PyTorch: the specification the kernel is tested
against. ``alpha`` times ATen's ``convolution_backward`` input gradient (groups 1, dilation 1),
with ``sign(weight)`` for the weight where ``weight_sign``, in the dtype of the inputs; ``conv2d_integer_input`` is ATen's stride-1 ``conv2d``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_input_grad(grad_y, weight, input_size: list[int], stride: list[int], padding: list[int], alpha: float,
                    weight_sign: bool = False):
    """grad_y ``[N, O, OH, OW]``, weight ``[O, C, KH, KW]`` -> grad_x ``[N, C, *input_size]``."""
    weight = weight.sign() if weight_sign else weight
    stand_in = grad_y.new_zeros(()).expand(grad_y.shape[0], weight.shape[1], *input_size)  # only its shape is read
    grad_x = torch.ops.aten.convolution_backward(grad_y, stand_in, weight, None, list(stride), list(padding), [1, 1],
                                                 False, [0, 0], 1, [True, False, False])[0]
    return grad_x * alpha


def conv2d_integer_input(x, weight, padding: list[int]):
    """x ``[N, C, H, W]``, weight ``[O, C, KH, KW]`` -> ``[N, O, H + 2 ph - KH + 1, W + 2 pw - KW + 1]``."""
    return F.conv2d(x, weight, padding=list(padding))
