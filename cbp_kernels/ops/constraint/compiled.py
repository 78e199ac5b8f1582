"""The `cpu` and `cuda` backends: the extension's kernels (csrc/cpu/constraint.cpp,
csrc/cuda/constraint.cu), chosen by the dispatcher from the tensors' device. Same signature
as ``reference``."""
from __future__ import annotations

import torch


def quantize(w, table):
    return torch.ops.cbp_kernels_ext.constraint_quantize(w, table)


def constraint_pass(weights, lambdas, table, grads, lambda_grads):
    return torch.ops.cbp_kernels_ext.constraint_pass(weights, lambdas, table, grads, lambda_grads)


def multiplier_step(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars):
    torch.ops.cbp_kernels_ext.constraint_multiplier_step(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars)
