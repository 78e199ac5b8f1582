"""The `cupy` backend of bit packing: the kernels of csrc/cuda/bitpack.cuh (the same source the
`cuda` backend compiles), JIT-compiled by CuPy's NVRTC (ops/_cupy.py). Same signature as
``reference``; CUDA tensors only."""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import launch_items
from .reference import WORD_BITS

# The bitpack kernel of each dtype (its suffix in csrc/cuda/bitpack.cuh): the CPU kernel's dtypes.
_PACK_SUFFIX = {torch.bool: "b8", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                torch.int64: "i64", torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32",
                torch.float64: "f64"}


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] with any strides -> (int32 [B, R, ceil(C/32)], int64 0-dim count of values not 0 or 1)."""
    B, R, C = x.shape
    words = -(-C // WORD_BITS)
    out = torch.empty(B, R, words, dtype=torch.int32, device=x.device)
    non_binary = torch.zeros((), dtype=torch.int64, device=x.device)
    # 16-bit floats cross as int16 views (CuPy has no bfloat16), bool as uint8: same bytes.
    data = x.view(torch.uint8) if x.dtype == torch.bool else x
    launch_items("bitpack", f"bitpack_{_PACK_SUFFIX[x.dtype]}", x.device, out.numel(),
                 (data, np.int64(B), np.int64(R), np.int64(C), *(np.int64(s) for s in x.stride()), np.int64(words),
                  out, non_binary))
    return out, non_binary


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = words.shape[0]
    out = torch.empty(rows, size, dtype=torch.uint8, device=words.device)
    launch_items("bitpack", "bitunpack_u8", words.device, out.numel(),
                 (words.contiguous(), out, np.int64(rows), np.int64(words.shape[1]), np.int64(size)))
    return out.to(dtype)
