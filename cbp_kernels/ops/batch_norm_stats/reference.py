"""Batch-norm statistics in plain PyTorch: the specification the kernel is tested against.

ATen's CPU arithmetic (torch 2.13, aten/src/ATen/native/cpu/batch_norm_kernel.cpp and
Normalization.cpp) for x ``[N, C, *]`` float32 contiguous, per channel over its M = N * HW
values in memory order: two sequential float64 sums (``cumsum`` in float64 adds in order, as
ATen's scalar loop), the variance terms squared in float32, the divisions by M in float32:

    mean      = float(sum(double(x)) / M)
    var_sum   = float(sum(double(float((x - mean)^2))))
    invstd    = float(1 / sqrt(double(var_sum / M) + eps))         (0 if var and eps are 0)
    running_mean <- m * mean + (1 - m) * running_mean               (float32, m = float(momentum))
    running_var  <- float(m * double(var_sum / (M - 1)) + double((1 - m) * running_var))
"""
from __future__ import annotations

import torch


def batch_norm_stats(x, running_mean, running_var, momentum: float, eps: float):
    """(mean, invstd) ``[C]`` float32 of x ``[N, C, *]``; updates running_mean / running_var
    ``[C]`` (or None) in place."""
    C = x.shape[1]
    M = x.numel() // C
    planes = x.transpose(0, 1).reshape(C, M)
    mean = (planes.double().cumsum(1)[:, -1] / M).float()
    d = planes - mean[:, None]
    var_sum = (d * d).double().cumsum(1)[:, -1].float()
    var = (var_sum / M).double()  # float32 / int: a float32 division in ATen
    invstd = torch.where((var == 0) & (eps == 0), 0.0, 1.0 / torch.sqrt(var + eps)).float()
    m = torch.tensor(momentum, dtype=torch.float32)
    if running_mean is not None:
        running_mean.copy_(m * mean + (1 - m) * running_mean)
    if running_var is not None:
        running_var.copy_((m.double() * (var_sum / (M - 1)).double() + ((1 - m) * running_var).double()).float())
    return mean, invstd
