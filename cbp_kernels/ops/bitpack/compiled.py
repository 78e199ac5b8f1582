"""The `cpu` and `cuda` backends: the extension's kernels (csrc/cpu/bitpack.cpp,
csrc/cuda/bitconv.cu), chosen by the dispatcher from the tensor's device. Same signature
as ``reference``."""
from __future__ import annotations

import torch


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    words, bad = torch.ops.cbp_kernels_ext.bitpack(x)
    return words, bad


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.cbp_kernels_ext.bitunpack(words, size, dtype)
