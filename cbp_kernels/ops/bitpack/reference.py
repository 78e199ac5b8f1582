"""Bit packing in plain PyTorch: the specification every kernel is tested against.

Rows of C values in {0, 1} become ceil(C/32) 32-bit words, channel c in bit c % 32 of word
c // 32 (least significant bit first), unused bits 0. Words are held in int32 storage (the
same 32 bits as the uint32 word; torch has few uint32 ops). Shapes: x [B, R, C] (any
strides) -> ([B, R, Wc] words, the count of values other than 0 and 1 as a 0-dim int64).
"""
from __future__ import annotations

import torch

WORD_BITS = 32


def count_non_binary(x: torch.Tensor) -> torch.Tensor:
    """The number of values of ``x`` other than 0 and 1 (NaN included), a 0-dim int64 tensor."""
    if x.dtype == torch.bool:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return ((x != 0) & (x != 1)).sum()


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, R, C] (any dtype) -> (int32 [B, R, ceil(C/32)], count_non_binary(x))."""
    return pack_rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1), count_non_binary(x)


def pack_rows(x: torch.Tensor) -> torch.Tensor:
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
