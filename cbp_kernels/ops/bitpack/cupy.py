"""The `cupy` backend of bit packing: the kernels of csrc/cuda/bitconv.cuh (the same source
the `cuda` backend compiles), JIT-compiled by CuPy's NVRTC. Same signature as ``reference``.
``launch`` also serves the bit-packed convolution (ops/bitconv/cupy.py)."""
from __future__ import annotations

import functools

import cupy
import torch

from .._cuda_source import cuda_source
from .reference import WORD_BITS, count_non_binary

_THREADS = 256
# --fmad=false: float(c) * scale + bias stays two roundings (no FMA), as the reference.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")


@functools.lru_cache(maxsize=None)
def _module(device_index: int) -> cupy.RawModule:
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source("bitconv"), options=NVRTC_OPTIONS)


def launch(name: str, n: int, *args) -> None:
    """Runs kernel ``name`` of csrc/cuda/bitconv.cuh with one thread per item over ``n``
    items on torch's current stream."""
    device = torch.cuda.current_device()
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        _module(device).get_function(name)(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def as_cupy(t: torch.Tensor) -> cupy.ndarray:
    return cupy.from_dlpack(t.detach())


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _pack_rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1), count_non_binary(x)


def _pack_rows(x: torch.Tensor) -> torch.Tensor:
    rows, size = x.shape
    words = -(-size // WORD_BITS)
    out = torch.empty(rows, words, dtype=torch.int32, device=x.device)
    if out.numel():
        launch("bitpack_u8_kernel", out.numel(), as_cupy(x.ne(0).to(torch.uint8)), as_cupy(out),
               cupy.int64(rows), cupy.int64(size), cupy.int64(words))
    return out


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = words.shape[0]
    out = torch.empty(rows, size, dtype=torch.uint8, device=words.device)
    if out.numel():
        launch("bitunpack_u8_kernel", out.numel(), as_cupy(words), as_cupy(out),
               cupy.int64(rows), cupy.int64(words.shape[1]), cupy.int64(size))
    return out.to(dtype)
