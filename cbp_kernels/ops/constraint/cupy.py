"""The `cupy` backend: the CUDA kernels of csrc/cuda/constraint.cuh compiled at run time by
CuPy's NVRTC (for an extension built without CUDA). Same kernels, launch geometry and float32
math as the `cuda` backend, launched on torch's current stream; tensors cross by DLPack
(zero copy). Same signature as ``reference``; CUDA tensors only.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .._cuda_source import cuda_source
from ._chunks import launch_table

NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")  # no mul+add contraction: grads round as the reference's
THREADS = 256  # kConstraintThreads in csrc/cuda/constraint.cuh
CHUNK = 4096  # kConstraintChunk in csrc/cuda/constraint.cuh
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source("constraint"), options=NVRTC_OPTIONS).get_function(name)


def _arg(t: torch.Tensor):
    """A zero-copy CuPy view (only the address matters; 16-bit floats travel as int16)."""
    import cupy

    return cupy.from_dlpack(t.view(torch.int16) if t.element_size() == 2 else t)


def _launch(name: str, device: torch.device, grid: int, shared: int, args: tuple) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        _kernel(name, index)((grid,), (THREADS,), tuple(_arg(a) if isinstance(a, torch.Tensor) else a for a in args),
                             shared_mem=shared)


def constraint_pass(weights, lambdas, table, grads, lambda_grads):
    meta, n_chunks = launch_table(weights, lambdas, grads, lambda_grads, CHUNK)
    partial = torch.zeros(max(n_chunks, 1), 2, dtype=torch.float64, device=weights[0].device)
    k = table.shape[2]
    if n_chunks:
        _launch(f"constraint_pass_{_SUFFIX[weights[0].dtype]}", weights[0].device, n_chunks, 16 * k,
                (meta, np.int32(len(weights)), table.contiguous(), np.int32(k), partial))
    return partial.sum(0)


def quantize(w, table):
    x = w.contiguous()
    out = torch.empty_like(x)
    n, k = x.numel(), table.shape[2]
    if n:
        blocks = min((n + THREADS - 1) // THREADS, 65535)
        _launch(f"constraint_quantize_{_SUFFIX[x.dtype]}", x.device, blocks, 16 * k,
                (x, out, table.contiguous(), np.int32(k), np.int64(n)))
    return out
