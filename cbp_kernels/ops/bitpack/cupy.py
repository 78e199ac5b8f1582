"""The `cupy` backend of bit packing: the kernels of csrc/cuda/bitconv.cuh (the same source
the `cuda` backend compiles), JIT-compiled by CuPy's NVRTC. Same signature as ``reference``.
``module()`` also serves the bit-packed convolution (ops/bitconv/cupy.py)."""
from __future__ import annotations

import functools
from pathlib import Path

import cupy
import torch

from .reference import WORD_BITS, count_non_binary

_THREADS = 256


def _csrc_dir() -> Path:
    """csrc/ of the checkout, else the copy setup.py ships in the package (cbp_kernels/_csrc)."""
    package = Path(__file__).resolve().parents[2]
    for root in (package.parent / "csrc", package / "_csrc"):
        if (root / "cuda" / "bitconv.cuh").is_file():
            return root
    raise FileNotFoundError("csrc/cuda/bitconv.cuh not found in the checkout or the package")


@functools.lru_cache(maxsize=None)
def module() -> cupy.RawModule:
    return cupy.RawModule(code='#include "cuda/bitconv.cuh"\n', options=("-std=c++17", f"-I{_csrc_dir()}"))


def launch(name: str, n: int, *args) -> None:
    """Runs kernel ``name`` with one thread per item over ``n`` items on torch's current stream."""
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        module().get_function(name)(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


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
