"""Triton backend of the sigmoid-sum quantizer (same signature as ``reference``); equations
in csrc/common/sigmoid_quant_math.h, with the CUDA kernel's IEEE division and expf on a GPU
(ops/_triton.py). One program per BLOCK weights; the backward stores each program's partial
sums of alpha's and beta's gradients (float32 over its BLOCK weights), added on the host in
float64 in program order: deterministic, no float32 atomics."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LAUNCH_OPTIONS, exp, grid, use_libdevice
from .reference import backward_buffers

# 1024 elements per program: a power of two that keeps the interpreter (CPU tests) quick and
# gives 8 warps x 128 elements on a GPU.
BLOCK = 1024


@triton.jit
def _sigmoid_sum(w, beta, temperature, gaps_ptr, mids_ptr, offset, N_SIG: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """(sum_i s_i sig(z_i) - o, sum_i s_i sig'(z_i)), z_i = T (beta w - b_i), sig'(z) = e / (1 + e)^2, e = exp(-|z|)."""
    value = tl.zeros_like(w)
    slope = tl.zeros_like(w)
    one = tl.full(w.shape, 1.0, tl.float32)
    for i in tl.static_range(N_SIG):
        gap = tl.load(gaps_ptr + i)
        z = temperature * (beta * w - tl.load(mids_ptr + i))
        e = exp(-tl.abs(z), USE_LIBDEVICE)  # the stable sigmoid (csrc/common/sigmoid_quant_math.h)
        sig = tl.where(z >= 0.0, tl.div_rn(one, 1.0 + e), tl.div_rn(e, 1.0 + e))
        value += gap * sig
        slope += gap * tl.div_rn(e, (1.0 + e) * (1.0 + e))
    return value - offset, slope


@triton.jit
def _forward_kernel(w_ptr, y_ptr, alpha_ptr, beta_ptr, gaps_ptr, mids_ptr, offset, temperature, n,
                    N_SIG: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    # y = alpha * (sum_i s_i sig(z_i) - o)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    value, _ = _sigmoid_sum(w, tl.load(beta_ptr), temperature, gaps_ptr, mids_ptr, offset, N_SIG, USE_LIBDEVICE)
    y = tl.load(alpha_ptr) * value
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(gy_ptr, w_ptr, gw_ptr, partial_ptr, alpha_ptr, beta_ptr, gaps_ptr, mids_ptr, offset,
                     temperature, n, N_SIG: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    # dL/dw = gy alpha beta T slope; this program's sums of gy * dy/dalpha and gy * dy/dbeta
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr)
    beta = tl.load(beta_ptr)
    value, slope = _sigmoid_sum(w, beta, temperature, gaps_ptr, mids_ptr, offset, N_SIG, USE_LIBDEVICE)
    tl.store(gw_ptr + offs, (gy * alpha * beta * temperature * slope).to(gw_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.where(mask, gy * value, 0.0), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.where(mask, gy * alpha * w * temperature * slope, 0.0), axis=0))


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float):
    w = w.contiguous()
    y = torch.empty_like(w)
    _forward_kernel[grid(triton.cdiv(w.numel(), BLOCK))](
        w, y, alpha, beta, gaps, mids, offset, temperature, w.numel(),
        N_SIG=gaps.numel(), USE_LIBDEVICE=use_libdevice(), BLOCK=BLOCK, **LAUNCH_OPTIONS,
    )
    return y


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    grad_y, w, grad_w, grad_a, grad_b = backward_buffers(grad_y, w)
    programs = triton.cdiv(w.numel(), BLOCK)
    partial = torch.empty(programs, 2, dtype=torch.float32, device=w.device)
    _backward_kernel[grid(programs)](
        grad_y, w, grad_w, partial, alpha, beta, gaps, mids, offset, temperature, w.numel(),
        N_SIG=gaps.numel(), USE_LIBDEVICE=use_libdevice(), BLOCK=BLOCK, **LAUNCH_OPTIONS,
    )
    sums = partial.double().sum(0)
    grad_a.copy_(sums[0])
    grad_b.copy_(sums[1])
    return grad_w, grad_a, grad_b
