"""Bit packing in plain PyTorch: the specification every kernel is tested against.

Rows of C values in {0, 1} become ceil(C/32) 32-bit words, channel c in bit c % 32 of word
c // 32 (least significant bit first), unused bits 0. Words are held in int32 storage (the
same 32 bits as the uint32 word; torch has few uint32 ops). Shapes: x [R, C] -> [R, Wc].
"""
from __future__ import annotations

import torch

WORD_BITS = 32


def pack(x: torch.Tensor) -> torch.Tensor:
    """x [R, C] (any dtype, values 0 / 1) -> int32 [R, ceil(C/32)]."""
    rows, size = x.shape
    words = -(-size // WORD_BITS)
    bits = torch.zeros(rows, words * WORD_BITS, dtype=torch.int64, device=x.device)
    bits[:, :size] = (x != 0).to(torch.int64)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=x.device)
    packed = (bits.view(rows, words, WORD_BITS) << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 [R, Wc] -> [R, size] of ``dtype`` holding 0 / 1."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, then the low bit: exact
    return bits.reshape(words.shape[0], -1)[:, :size].to(dtype)
