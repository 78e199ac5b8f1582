"""The `triton` backend of the bit-packed convolution. Same signature as ``reference``.

One program computes a [BLOCK_P output pixels, BLOCK_O output channels of one group] tile:
for every in-bounds tap (kh, kw) and channel word w it ANDs the pixel words with the
channels' weight words and counts bits (csrc/common/bitconv_math.h):
    binary c = sum 2*popc(x & w) - popc(x),   ternary c = sum popc(x & p) - popc(x & n),
    out = float32(c) * scale (+ bias).
The fused epilogue (``conv2d_lif``) shares that count (``_count``): a program owns one output
spike word (32 channels) of BLOCK_P pixels and walks the T timesteps inside.
Bit count: libdevice ``popc`` on a GPU; under ``TRITON_INTERPRET=1`` neither libdevice nor
inline asm runs, so the constexpr flag ``USE_LIBDEVICE=False`` selects a SWAR count.
Grids are 1-D (program = pixel block + output-channel block * pixel blocks), pixel indices
int64: no limit from grid.y (65535) and no int32 overflow past 2^31 output values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LAUNCH_OPTIONS, grid, use_libdevice
from ..bitpack import WORD_BITS
from ..neuron.params import NeuronParams
from ..neuron.triton import _charge, _reset
from .reference import Geometry


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
def _count(
    x_ptr, w_ptr, n, oh, ow, pmask, grp, o, omask, H, W, O, Cw, Wg, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    TERNARY: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """The integer counts c [BLOCK_P pixels (n, oh, ow), BLOCK_O channels o of group grp]
    (the module docstring's equation), int32."""
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
    return acc


@triton.jit
def _tile(P, OH, OW, Og, p_blocks, o_blocks, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    """This program's tile: BLOCK_P pixels (index q (int64), n, oh, ow, mask) of the P = N*OH*OW
    and BLOCK_O channels (o, mask) of group grp; column = grp * o_blocks + channel block."""
    pid = tl.program_id(0)
    column = pid // p_blocks
    grp = column // o_blocks
    ol = (column % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    q = (pid % p_blocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (q // (OH * OW)).to(tl.int32)
    oh = ((q // OW) % OH).to(tl.int32)
    ow = (q % OW).to(tl.int32)
    return column, grp, q, n, oh, ow, q < P, grp * Og + ol, ol < Og


@triton.jit
def _bitconv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, scale,
    P, H, W, OH, OW, O, Og, Cw, Wg, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, p_blocks, o_blocks,
    HAS_BIAS: tl.constexpr, TERNARY: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """out[pixel, o] = float32(c) * scale (+ bias[o]) on a [BLOCK_P, BLOCK_O] tile of one group."""
    _, grp, pix, n, oh, ow, pmask, o, omask = _tile(P, OH, OW, Og, p_blocks, o_blocks, BLOCK_P, BLOCK_O)
    acc = _count(x_ptr, w_ptr, n, oh, ow, pmask, grp, o, omask, H, W, O, Cw, Wg, KH, KW,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TERNARY, USE_LIBDEVICE, BLOCK_P, BLOCK_O)
    out = acc.to(tl.float32) * scale
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + o, mask=omask, other=0.0)[None, :]
    tl.store(out_ptr + pix[:, None] * O + o[None, :], out, mask=pmask[:, None] & omask[None, :])


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit(do_not_specialize=["T", "Nb"])
def _bitconv_lif_kernel(
    x_ptr, w_ptr, mul_ptr, add_ptr, spike_ptr, v_last_ptr, T, Nb, Q, decay, v_threshold, v_reset,
    H, W, OH, OW, O, Og, Cw, Wg, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, p_blocks, o_blocks, Wo,
    KIND: tl.constexpr, SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    TERNARY: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Fused epilogue: a program owns the output spike word `column` (channels o = 32 * column + j,
    BLOCK_O = 32, in one group) of BLOCK_P pixels q = (n, oh, ow) of the Nb samples, and walks
    time inside with the membrane V in registers (from V_reset): for t = 0..T-1, on image t * Nb + n,
        y = float32(c) * mul[o] + add[o];  H = charge(V, y);  S = (H - V_th >= 0);  V = reset(H, S)
    (ops/neuron/triton.py's helpers), spikes[t * Q + q, column] = OR_j S_j << j (Q = Nb*OH*OW);
    v_last[q, o] = V after t = T - 1. No float activation is written."""
    column, grp, q, n, oh, ow, pmask, o, omask = _tile(Q, OH, OW, Og, p_blocks, o_blocks, BLOCK_P, BLOCK_O)
    mul = tl.load(mul_ptr + o, mask=omask, other=0.0)[None, :]
    add = tl.load(add_ptr + o, mask=omask, other=0.0)[None, :]
    bit = (tl.full([BLOCK_O], 1, tl.uint32) << tl.arange(0, BLOCK_O).to(tl.uint32))[None, :]
    v = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32) + v_reset
    row = q  # int64 spike row t * Q + q
    for t in range(T):
        c = _count(x_ptr, w_ptr, n + t * Nb, oh, ow, pmask, grp, o, omask, H, W, O, Cw, Wg, KH, KW,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TERNARY, USE_LIBDEVICE, BLOCK_P, BLOCK_O)
        h = _charge(v, c.to(tl.float32) * mul + add, decay, v_reset, KIND, DECAY_INPUT)
        s = tl.where(h - v_threshold >= 0.0, 1.0, 0.0)
        v = _reset(h, s, v_threshold, v_reset, SOFT_RESET)
        word = tl.reduce(tl.where((s != 0.0) & omask[None, :], bit, 0), 1, _bit_or)
        tl.store(spike_ptr + row * Wo + column, word.to(tl.int32, bitcast=True), mask=pmask)
        row += Q
    tl.store(v_last_ptr + q[:, None] * O + o[None, :], v, mask=pmask[:, None] & omask[None, :])


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    g = Geometry.of(x, planes, stride, padding, dilation, groups)
    out = g.empty_output(x)
    if out.numel() == 0:
        return out
    P = g.N * g.OH * g.OW
    p_blocks, o_blocks = triton.cdiv(P, _BLOCK_P), triton.cdiv(g.out_per_group, _BLOCK_O)
    _bitconv_kernel[grid(p_blocks * groups * o_blocks)](
        x, planes, out if bias is None else bias, out, float(scale),
        P, g.H, g.W, g.OH, g.OW, out.shape[-1], g.out_per_group, x.shape[-1], g.words_per_group, g.KH, g.KW,
        *stride, *padding, *dilation, p_blocks, o_blocks,
        HAS_BIAS=bias is not None, TERNARY=g.planes == 2, USE_LIBDEVICE=use_libdevice(),
        BLOCK_P=_BLOCK_P, BLOCK_O=_BLOCK_O, **LAUNCH_OPTIONS,
    )
    return out


def conv2d_lif(x, planes, mul, add, stride, padding, dilation, groups: int, T: int, decay: float, p: NeuronParams):
    g = Geometry.of(x, planes, stride, padding, dilation, groups)
    spikes, v_last = g.empty_lif_outputs(x, T)
    if v_last.numel() == 0:
        return spikes, v_last
    Nb = g.N // T
    Q = Nb * g.OH * g.OW
    p_blocks, o_blocks = triton.cdiv(Q, _BLOCK_P), triton.cdiv(g.out_per_group, WORD_BITS)  # a column per word
    _bitconv_lif_kernel[grid(p_blocks * groups * o_blocks)](
        x, planes, mul, add, spikes, v_last, T, Nb, Q, float(decay), p.v_threshold, p.reset_value,
        g.H, g.W, g.OH, g.OW, v_last.shape[-1], g.out_per_group, x.shape[-1], g.words_per_group, g.KH, g.KW,
        *stride, *padding, *dilation, p_blocks, o_blocks, spikes.shape[-1],
        KIND=p.kind, SOFT_RESET=p.soft_reset, DECAY_INPUT=p.decay_input, TERNARY=g.planes == 2,
        USE_LIBDEVICE=use_libdevice(), BLOCK_P=_BLOCK_P, BLOCK_O=WORD_BITS, **LAUNCH_OPTIONS,
    )
    return spikes, v_last
