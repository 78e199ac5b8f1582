"""The `triton` backend of bit packing. Same signature as ``reference``.

One program packs a [BLOCK_R, BLOCK_W] tile of words: it loads the 32 values of each word,
shifts value b to bit b and ORs them (a reduction), so word = OR_b (x[32w + b] != 0) << b.
Grids are 1-D (program = word block + row block * word blocks) and column indices int64, so a
row of any length packs (grid.y would stop at 65535 blocks, int32 columns at 2^31 values).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LAUNCH_OPTIONS, grid
from .reference import WORD_BITS, count_non_binary

# Tile of words per program (rows x words): small enough for the interpreter's CPU tests,
# large enough to fill a GPU SM with 4 warps.
_BLOCK_R = 16
_BLOCK_W = 8


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack_kernel(x_ptr, out_ptr, R, C, Wc, w_blocks, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // w_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    words = (pid % w_blocks).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    bits = tl.arange(0, 32)
    cols = words[:, None] * 32 + bits[None, :]  # [BLOCK_W, 32]
    mask = (rows[:, None, None] < R) & (cols[None, :, :] < C)
    x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * C + cols[None, :, :], mask=mask, other=0)
    shifted = (x != 0).to(tl.uint32) << bits[None, None, :].to(tl.uint32)
    packed = tl.reduce(shifted, 2, _or)
    out_mask = (rows[:, None] < R) & (words[None, :] < Wc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * Wc + words[None, :], packed.to(tl.int32, bitcast=True), mask=out_mask)


@triton.jit
def _unpack_kernel(w_ptr, out_ptr, R, Wc, size, c_blocks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // c_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % c_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < size)
    words = tl.load(w_ptr + rows[:, None].to(tl.int64) * Wc + cols[None, :] // 32, mask=mask, other=0)
    bit = (words.to(tl.uint32, bitcast=True) >> (cols[None, :] % 32).to(tl.uint32)) & 1
    tl.store(out_ptr + rows[:, None].to(tl.int64) * size + cols[None, :], bit.to(tl.uint8), mask=mask)


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _pack_rows(x.reshape(-1, x.shape[-1]).contiguous()).reshape(*x.shape[:-1], -1), count_non_binary(x)


def _pack_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    rows, size = x.shape
    words = -(-size // WORD_BITS)
    out = torch.empty(rows, words, dtype=torch.int32, device=x.device)
    if out.numel():
        w_blocks = triton.cdiv(words, _BLOCK_W)
        _pack_kernel[grid(triton.cdiv(rows, _BLOCK_R) * w_blocks)](
            x, out, rows, size, words, w_blocks, BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W, **LAUNCH_OPTIONS)
    return out


def unpack(words: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = words.shape[0]
    # Bits are written as uint8 and cast after (the interpreter stores bfloat16 wrongly).
    out = torch.empty(rows, size, dtype=torch.uint8, device=words.device)
    if out.numel():
        c_blocks = triton.cdiv(size, _BLOCK_W * WORD_BITS)
        _unpack_kernel[grid(triton.cdiv(rows, _BLOCK_R) * c_blocks)](
            words, out, rows, words.shape[1], size, c_blocks, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_W * WORD_BITS,
            **LAUNCH_OPTIONS)
    return out.to(dtype)
