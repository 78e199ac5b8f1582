"""The `cupy` backend of bit packing: the kernels of csrc/cuda/bitconv.cuh (the same source
the `cuda` backend compiles), JIT-compiled by CuPy's NVRTC (ops/_cupy.py). Same signature as
``reference``. ``launch_items`` also serves the bit-packed convolution (ops/bitconv/cupy.py)."""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import launch
from .reference import WORD_BITS, count_non_binary

_THREADS = 256


def launch_items(name: str, device: torch.device, n: int, *args) -> None:
    """Runs kernel ``name`` of csrc/cuda/bitconv.cuh with one thread per item over ``n``
    items on torch's current stream."""
    launch("bitconv", name, device, (n + _THREADS - 1) // _THREADS, _THREADS, args)


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _pack_rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1), count_non_binary(x)


def _pack_rows(x: torch.Tensor) -> torch.Tensor:
    rows, size = x.shape
    words = -(-size // WORD_BITS)
    out = torch.empty(rows, words, dtype=torch.int32, device=x.device)
    if out.numel():
        launch_items("bitpack_u8_kernel", x.device, out.numel(), x.ne(0).to(torch.uint8), out,
                     np.int64(rows), np.int64(size), np.int64(words))
    return out


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = words.shape[0]
    out = torch.empty(rows, size, dtype=torch.uint8, device=words.device)
    if out.numel():
        launch_items("bitunpack_u8_kernel", words.device, out.numel(), words.contiguous(), out,
                     np.int64(rows), np.int64(words.shape[1]), np.int64(size))
    return out.to(dtype)
