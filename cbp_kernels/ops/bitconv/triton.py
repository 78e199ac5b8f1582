"""The `triton` backend of the bit-packed convolution. Same signature as ``reference``.

One program computes a [BLOCK_P output pixels, BLOCK_O output channels of one group] tile:
for every in-bounds tap (kh, kw) and channel word w it ANDs the pixel words with the
channels' weight words and counts bits (csrc/common/bitconv_math.h):
    binary c = sum 2*popc(x & w) - popc(x),   ternary c = sum popc(x & p) - popc(x & n),
    out = float32(c) * scale (+ bias).
Bit count: libdevice ``popc`` on a GPU; under ``TRITON_INTERPRET=1`` neither libdevice nor
inline asm runs, so the constexpr flag ``USE_LIBDEVICE=False`` selects a SWAR count.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import output_size


# Tile: 32 pixels x 32 channels keeps the int32 accumulator at 1024 values (8 per thread
# with 4 warps) and the CPU interpreter's tests small.
_BLOCK_P = 32
_BLOCK_O = 32


@triton.jit
def _popc(v, USE_LIBDEVICE: tl.constexpr):
    """Bits set in each uint32 of v, as int32."""
    if USE_LIBDEVICE:
        return tl.extra.cuda.libdevice.popc(v.to(tl.int32, bitcast=True))
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return (v & 0x3F).to(tl.int32)


@triton.jit
def _bitconv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, scale,
    N, H, W, OH, OW, O, Og, Cw, Wg, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, o_blocks,
    HAS_BIAS: tl.constexpr, TERNARY: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    grp = tl.program_id(1) // o_blocks
    ol = (tl.program_id(1) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = ol < Og
    o = grp * Og + ol
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < N * OH * OW
    n = pix // (OH * OW)
    oh = (pix // OW) % OH
    ow = pix % OW
    K = KH * KW * Wg
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.int32)
    xcount = tl.zeros([BLOCK_P], dtype=tl.int32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            inside = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xbase = ((n.to(tl.int64) * H + ih) * W + iw) * Cw + grp * Wg
            for w in range(Wg):
                xw = tl.load(x_ptr + xbase + w, mask=inside, other=0).to(tl.uint32, bitcast=True)
                k = (kh * KW + kw) * Wg + w
                wp = tl.load(w_ptr + o.to(tl.int64) * K + k, mask=omask, other=0).to(tl.uint32, bitcast=True)
                acc += _popc(xw[:, None] & wp[None, :], USE_LIBDEVICE)
                if TERNARY:
                    wn = tl.load(w_ptr + (O + o.to(tl.int64)) * K + k, mask=omask, other=0).to(tl.uint32, bitcast=True)
                    acc -= _popc(xw[:, None] & wn[None, :], USE_LIBDEVICE)
                else:
                    xcount += _popc(xw, USE_LIBDEVICE)
    if not TERNARY:
        acc = 2 * acc - xcount[:, None]
    out = acc.to(tl.float32) * scale
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + o, mask=omask, other=0.0)[None, :]
    tl.store(out_ptr + pix[:, None].to(tl.int64) * O + o[None, :], out, mask=pmask[:, None] & omask[None, :])


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    N, H, W, Cw = x.shape
    P, O, KH, KW, Wg = planes.shape
    OH, OW = output_size(H, W, KH, KW, stride, padding, dilation)
    out = torch.empty(N, OH, OW, O, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    Og = O // groups
    o_blocks = triton.cdiv(Og, _BLOCK_O)
    grid = (triton.cdiv(N * OH * OW, _BLOCK_P), groups * o_blocks)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    # enable_fp_fusion=False: c * scale + bias stays two roundings (no FMA), as the spec.
    extra = {} if interpreted else {"enable_fp_fusion": False}
    _bitconv_kernel[grid](
        x, planes, out if bias is None else bias, out, float(scale),
        N, H, W, OH, OW, O, Og, Cw, Wg, KH, KW,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], o_blocks,
        HAS_BIAS=bias is not None, TERNARY=P == 2, USE_LIBDEVICE=x.is_cuda and not interpreted,
        BLOCK_P=_BLOCK_P, BLOCK_O=_BLOCK_O, **extra,
    )
    return out
