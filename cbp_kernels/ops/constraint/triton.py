"""The `triton` backend of the constraint ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``constraint_pass`` is ONE launch over a chunk table concatenated from all layers: program p
handles BLOCK weights of one layer, read with the layers' sizes and base addresses from one
int64 launch table (``_chunks.launch_table``). Math: csrc/common/constraint_math.h (the same
selects), spec: reference.py. Per-program partial sums (float32 over BLOCK elements) are added
in float64 on the host side of the launch, in program order (deterministic).

``multiplier_step`` is ONE launch over the same chunks (exp_avg / exp_avg_sq in the grad /
lambda_grad columns of the launch table): cs(w; g), then the Adam / AdamW ascent of
csrc/common/constraint_math.h ``multiplier_adam``, IEEE division and sqrt (``div_rn``,
``sqrt_rn``), as the other backends.

Every launch compiles without FMA contraction (ops/_triton.py): the pass's ``grad + lam * slope``
and the step's updates round as the reference's, bit for bit in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LAUNCH_OPTIONS, grid
from ._chunks import launch_table

# Weights per program: 1024 float32 = 4 KiB per stream; a common memory-bound block size
# (enough bytes in flight per SM with 4 warps); not tuned on a GPU here.
BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _select(x, table_row, K: tl.constexpr):
    """(Q(x), keep): keep = 0 inside an unconstrained window, 1 elsewhere (constraint_math.h)."""
    q = tl.zeros_like(x) + tl.load(table_row)
    keep = tl.full(x.shape, 1.0, tl.float32)
    for j in tl.static_range(K - 1):
        mid = tl.load(table_row + K + j)
        nxt = tl.load(table_row + j + 1)
        lo = tl.load(table_row + 2 * K + j)
        hi = tl.load(table_row + 3 * K + j)
        q = tl.where(x >= mid, nxt, q)
        keep = tl.where((x >= lo) & (x < hi), 0.0, keep)
    return q, keep


@triton.jit
def _chunk(meta, L, N_CHUNKS, BLOCK: tl.constexpr):
    """(layer, offsets, mask) of this program's chunk of the launch table (_chunks.py)."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.load(meta + 5 * L + pid)
    offs = tl.load(meta + 5 * L + N_CHUNKS + pid) + tl.arange(0, BLOCK)
    return layer, offs, offs < tl.load(meta + layer)


@triton.jit
def _column(meta, L, layer, COLUMN: tl.constexpr, DTYPE: tl.constexpr):
    """Base address of ``layer``'s tensor in launch-table column 1-4 (w, lambda, grad or
    exp_avg, lambda_grad or exp_avg_sq)."""
    return tl.load(meta + COLUMN * L + layer).to(tl.pointer_type(DTYPE))


@triton.jit
def _constraint_pass_kernel(
    meta, table, partial, L, N_CHUNKS,
    DTYPE: tl.constexpr, K: tl.constexpr, GRAD: tl.constexpr, LGRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # sum lam*cs(w; g), sum cs(w); grad += lam * dcs/dw; lambda_grad = cs(w; g)   (meta: _chunks.py)
    pid = tl.program_id(0).to(tl.int64)
    layer, offs, mask = _chunk(meta, L, N_CHUNKS, BLOCK)
    w_ptr = _column(meta, L, layer, 1, DTYPE)
    lam_ptr = _column(meta, L, layer, 2, DTYPE)
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, keep = _select(x, table + layer * 4 * K, K)
    free = 2.0 * tl.abs(x - q)
    c = free * keep
    tl.store(partial + 2 * pid, tl.sum(tl.where(mask, lam * c, 0.0), 0))
    tl.store(partial + 2 * pid + 1, tl.sum(tl.where(mask, free, 0.0), 0))
    if GRAD:
        g_ptr = _column(meta, L, layer, 3, DTYPE)
        slope = tl.where(x >= q, 2.0, -2.0) * keep
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_ptr + offs, (g + lam * slope).to(DTYPE), mask=mask)
    if LGRAD:
        lg_ptr = _column(meta, L, layer, 4, DTYPE)
        tl.store(lg_ptr + offs, c.to(DTYPE), mask=mask)


@triton.jit
def _multiplier_step_kernel(meta, table, scalars, L, N_CHUNKS, DTYPE: tl.constexpr, K: tl.constexpr,
                            BLOCK: tl.constexpr):
    # grad = -cs(w; g) [+ l2*lam]; lam *= decay; m = lerp(m, grad, 1-beta1);
    # v = v*beta2 + ((1-beta2)*grad)*grad; lam += (-step_size*m) / (sqrt(v)/sqrt(bc2) + eps)
    layer, offs, mask = _chunk(meta, L, N_CHUNKS, BLOCK)
    w_ptr = _column(meta, L, layer, 1, DTYPE)
    lam_ptr = _column(meta, L, layer, 2, DTYPE)
    m_ptr = _column(meta, L, layer, 3, DTYPE)
    v_ptr = _column(meta, L, layer, 4, DTYPE)
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, keep = _select(x, table + layer * 4 * K, K)
    c = 2.0 * tl.abs(x - q) * keep
    # the scalars, in csrc/common/constraint_math.h MultiplierScalar order
    w1 = tl.load(scalars)
    beta2 = tl.load(scalars + 1)
    one_minus_beta2 = tl.load(scalars + 2)
    bias2_sqrt = tl.load(scalars + 3)
    eps = tl.load(scalars + 4)
    neg_step_size = tl.load(scalars + 5)
    l2 = tl.load(scalars + 6)
    decay = tl.load(scalars + 7)
    grad = -c
    grad = tl.where(l2 != 0.0, grad + l2 * lam, grad)
    diff = grad - m
    m = tl.where(w1 < 0.5, m + w1 * diff, grad - diff * (1.0 - w1))
    v = v * beta2 + (one_minus_beta2 * grad) * grad
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    lam = lam * decay + tl.div_rn(neg_step_size * m, denom)
    tl.store(lam_ptr + offs, lam.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _quantize_kernel(w, out, table, n, K: tl.constexpr, BLOCK: tl.constexpr):
    # out = l_k, k = #{j : w >= m_j}
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(w + offs, mask=mask, other=0.0)
    q, _ = _select(x.to(tl.float32), table, K)
    tl.store(out + offs, q.to(x.dtype), mask=mask)


def constraint_pass(weights, lambdas, table, grads, lambda_grads):
    meta, n_chunks = launch_table(weights, lambdas, grads, lambda_grads, BLOCK)
    partial = torch.zeros(max(n_chunks, 1), 2, dtype=torch.float32, device=weights[0].device)
    if n_chunks:
        _constraint_pass_kernel[grid(n_chunks)](
            meta, table.contiguous(), partial, len(weights), n_chunks,
            DTYPE=_TL_DTYPES[weights[0].dtype], K=table.shape[2], GRAD=bool(grads), LGRAD=bool(lambda_grads),
            BLOCK=BLOCK, **LAUNCH_OPTIONS,
        )
    return partial.double().sum(0)


def multiplier_step(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars):
    meta, n_chunks = launch_table(weights, lambdas, exp_avgs, exp_avg_sqs, BLOCK)
    if n_chunks:
        _multiplier_step_kernel[grid(n_chunks)](
            meta, table.contiguous(), scalars.contiguous(), len(weights), n_chunks,
            DTYPE=_TL_DTYPES[weights[0].dtype], K=table.shape[2], BLOCK=BLOCK, **LAUNCH_OPTIONS,
        )


def quantize(w, table):
    x = w.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _quantize_kernel[grid(triton.cdiv(n, BLOCK))](x, out, table.contiguous(), n, K=table.shape[2], BLOCK=BLOCK,
                                                      **LAUNCH_OPTIONS)
    return out
