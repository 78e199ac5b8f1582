"""The BatchNorm of the spiking layers: ``fold_batch_norm``, the ONE eval-mode fold of a
BatchNorm into the per-channel affine after a conv / linear layer (LIFConv2d's eval forward and
``pack()``, CQ's ``fuse_bn``), and BatchNorm (training mode) followed by the multi-step neuron
as ONE autograd node that saves only the BatchNorm's input.

Unfused, a conv - BN - neuron layer keeps two float tensors per layer for the backward: BN
keeps its input z, the neuron its input y = BN(z) (or H). Here the backward recomputes
y = BN(z) from z and the forward's batch statistics (``batch_norm_output``: one pass,
y = z * alpha + beta per channel with the arithmetic of ATen's CPU kernel, so bitwise the
forward's y and the same spikes; on CUDA the forward's op again), runs the neuron's backward from y
(``ops.neuron.op.backward_from_input``) and then BN's (``aten.native_batch_norm_backward``):
one float tensor per layer kept, for one elementwise pass over z in the backward. On the CPU in
float32 the forward's statistics come from ``ops.batch_norm_stats`` (bitwise ATen's, ~3x faster
than native_batch_norm's scalar float64 loops) and y from ``batch_norm_output``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.batch_norm_stats import batch_norm_stats, supported as batch_norm_stats_supported
from ..ops.neuron.op import backward_from_input, run
from ..ops.neuron.params import NeuronParams

__all__ = ["BatchNormNeuronFunction", "batch_norm_neuron", "batch_norm_output", "fold_batch_norm"]


def fold_batch_norm(bn: nn.modules.batchnorm._BatchNorm, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, shift)`` ``[C]`` with ``bn(y + bias) = y * gain + shift`` per channel, from the
    running statistics (eval mode): gain = gamma / sqrt(var + eps), shift = (bias - mean) * gain
    + beta (gamma = 1, beta = 0 without affine; bias None: 0). A layer's weight folds as
    ``W * gain`` along its output channels. Differentiable in gamma, beta and bias."""
    gain = torch.rsqrt(bn.running_var + bn.eps)
    gain = gain if bn.weight is None else bn.weight * gain
    shift = -bn.running_mean if bias is None else bias - bn.running_mean
    shift = shift * gain
    return gain, shift if bn.bias is None else shift + bn.bias


def batch_norm_output(z: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                      invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """y = BN(z) of a training-mode batch norm from its batch statistics ``mean`` / ``invstd``
    ``[C]`` (``aten.native_batch_norm``'s second and third outputs for this z): bitwise that
    op's first output, in one elementwise pass. z ``[N, C, ...]``; weight / bias ``[C]`` or None.

    ATen's CPU kernel (aten/src/ATen/native/cpu/batch_norm_kernel.cpp) computes, per channel,
    alpha = invstd * gamma and beta = beta_bn - mean * alpha, then y = z * alpha + beta, from
    the batch statistics in training and from invstd = 1 / sqrt(running_var + eps) in eval
    (``batch_norm_cpu_collect_linear_and_constant_terms``), with the same vector loop after it.
    So its EVAL mode with gamma = alpha, running_mean = mean, running_var = 1 and eps = 0
    (invstd exactly 1) rebuilds alpha and beta, and y, with the training call's arithmetic,
    its fused multiply-adds included, without the statistics passes (0.26 ms instead of
    1.08 ms on SEW-ResNet-18's [4, 64, 56, 56], one thread). Parameters in float32 or None
    (a float16 BN's float16 gamma would round alpha), z contiguous or channels-last (the
    kernel's layouts); elsewhere (e.g. CUDA, whose kernel computes (z - mean) * invstd * gamma
    + beta) the training op runs again."""
    if (z.device.type != "cpu" or any(p is not None and p.dtype != torch.float32 for p in (weight, bias))
            or not (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last))):
        return torch.ops.aten.native_batch_norm(z, weight, bias, None, None, True, 0.0, eps)[0]
    alpha = invstd if weight is None else invstd * weight
    return torch.ops.aten.native_batch_norm(z, alpha, bias, mean, torch.ones_like(mean), False, 0.0, 0.0)[0]


class BatchNormNeuronFunction(torch.autograd.Function):
    """(spike_seq, v_last) = neuron(BN(z)) with z ``[T*N, C, H, W]`` viewed as ``[T, N, C, H, W]``
    for the neuron; BN in training mode (batch statistics; ``running_mean`` / ``running_var``,
    when given, updated in place with ``momentum``). The neuron's arguments are those of
    ``ops.neuron.op.run`` (decay k, v_init, NeuronParams, backend)."""

    @staticmethod
    def forward(ctx, z, weight, bias, decay, v_init, running_mean, running_var, momentum: float, eps: float,
                steps: int, p: NeuronParams, backend: str):
        if batch_norm_stats_supported(z, weight, bias, running_mean, running_var):
            # CPU float32: the statistics (and running-stat update) bitwise ATen's, ~3x faster,
            # then ATen's own normalization from them (batch_norm_output: bitwise its y)
            mean, invstd = batch_norm_stats(z, running_mean, running_var, momentum, eps)
            y = batch_norm_output(z, weight, bias, mean, invstd, eps)
        else:
            y, mean, invstd = torch.ops.aten.native_batch_norm(z, weight, bias, running_mean, running_var, True,
                                                               momentum, eps)
        spike_seq, v_last = run(y.view(steps, -1, *y.shape[1:]), v_init, decay, p, backend)
        ctx.save_for_backward(z, weight, bias, decay, v_init, mean, invstd)
        ctx.conf = (eps, steps, p, backend)
        # an unused output's gradient stays None (the kernels' default), not a zero tensor: V[T-1]
        # is rarely used, and its [N, C, H, W] zeros were filled and read on every backward
        ctx.set_materialize_grads(False)
        return spike_seq, v_last

    @staticmethod
    def backward(ctx, grad_spike, grad_v_last):
        z, weight, bias, decay, v_init, mean, invstd = ctx.saved_tensors
        eps, steps, p, backend = ctx.conf
        y = batch_norm_output(z, weight, bias, mean, invstd, eps)  # bitwise the forward's y
        grad_y, grad_v_init, grad_decay = backward_from_input(
            grad_spike, grad_v_last, y.view(steps, -1, *y.shape[1:]), v_init, decay, p, backend,
            ctx.needs_input_grad[3])
        grad_z, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y.view_as(z), z, weight, None, None, mean, invstd, True, eps,
            [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[2]])
        return (grad_z, grad_w, grad_b, grad_decay if ctx.needs_input_grad[3] else None,
                grad_v_init if ctx.needs_input_grad[4] else None) + (None,) * 7


def batch_norm_neuron(z: torch.Tensor, bn: nn.BatchNorm2d, neuron: nn.Module, steps: int) -> torch.Tensor:
    """``neuron(bn(z).view(steps, -1, ...))`` in training mode through ``BatchNormNeuronFunction``:
    the same numbers and side effects as the two modules (BN's running statistics and
    ``num_batches_tracked`` updated once, the neuron's state ``v`` set to V[T-1]), one saved
    float tensor. ``z``: ``[T*N, C, H, W]``; returns the spikes ``[T, N, C, H, W]``."""
    momentum = 0.0
    if bn.track_running_stats:  # as nn.BatchNorm2d.forward counts the step
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    v_init, decay, p, backend = neuron.prepared(z.view(steps, -1, *z.shape[1:]))
    spike_seq, neuron.v = BatchNormNeuronFunction.apply(
        z, bn.weight, bn.bias, decay, v_init, bn.running_mean, bn.running_var, momentum, bn.eps, steps, p, backend)
    return spike_seq
