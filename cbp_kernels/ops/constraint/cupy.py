"""The `cupy` backend: the CUDA kernels of csrc/cuda/constraint.cuh compiled at run time by
CuPy's NVRTC (for an extension built without CUDA). Same kernels, launch geometry and float32
math as the `cuda` backend, launched on torch's current stream; tensors cross by DLPack
(zero copy). Same signature as ``reference``; CUDA tensors only.
"""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import dtype_suffix, launch
from ._chunks import launch_table

THREADS = 256  # kConstraintThreads in csrc/cuda/constraint.cuh
CHUNK = 4096  # kConstraintChunk in csrc/cuda/constraint.cuh


def constraint_pass(weights, lambdas, table, grads, lambda_grads):
    meta, n_chunks = launch_table(weights, lambdas, grads, lambda_grads, CHUNK)
    partial = torch.zeros(max(n_chunks, 1), 2, dtype=torch.float64, device=weights[0].device)
    k = table.shape[2]
    if n_chunks:
        launch("constraint", f"constraint_pass_{dtype_suffix(weights[0].dtype)}", weights[0].device, n_chunks, THREADS,
               (meta, np.int32(len(weights)), table.contiguous(), np.int32(k), partial), shared=16 * k)
    return partial.sum(0)


def multiplier_step(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars):
    meta, n_chunks = launch_table(weights, lambdas, exp_avgs, exp_avg_sqs, CHUNK)
    k = table.shape[2]
    if n_chunks:
        launch("constraint", f"constraint_multiplier_step_{dtype_suffix(weights[0].dtype)}", weights[0].device,
               n_chunks, THREADS, (meta, np.int32(len(weights)), table.contiguous(), np.int32(k), scalars.contiguous()),
               shared=16 * k)


def quantize(w, table):
    x = w.contiguous()
    out = torch.empty_like(x)
    n, k = x.numel(), table.shape[2]
    if n:
        blocks = min((n + THREADS - 1) // THREADS, 65535)
        launch("constraint", f"constraint_quantize_{dtype_suffix(x.dtype)}", x.device, blocks, THREADS,
               (x, out, table.contiguous(), np.int32(k), np.int64(n)), shared=16 * k)
    return out
