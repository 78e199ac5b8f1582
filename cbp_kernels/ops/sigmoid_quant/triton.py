"""Triton backend of the sigmoid-sum quantizer (same signature as ``reference``); equations
in csrc/common/sigmoid_quant_math.h. One program per BLOCK weights; the backward reduces
alpha's and beta's gradients per program and adds them with one atomic each."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import backward_buffers

# 1024 elements per program: a power of two that keeps the interpreter (CPU tests) quick and
# gives 8 warps x 128 elements on a GPU.
BLOCK = 1024


@triton.jit
def _sigmoid_sum(w, beta, temperature, gaps_ptr, mids_ptr, offset, N_SIG: tl.constexpr):
    value = tl.zeros_like(w)
    slope = tl.zeros_like(w)
    for i in tl.static_range(N_SIG):
        gap = tl.load(gaps_ptr + i)
        z = temperature * (beta * w - tl.load(mids_ptr + i))
        e = tl.exp(-tl.abs(z))  # the stable sigmoid (csrc/common/sigmoid_quant_math.h)
        sig = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        value += gap * sig
        slope += gap * (e / ((1.0 + e) * (1.0 + e)))
    return value - offset, slope


@triton.jit
def _forward_kernel(w_ptr, y_ptr, alpha_ptr, beta_ptr, gaps_ptr, mids_ptr, offset, temperature, n,
                    N_SIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    value, _ = _sigmoid_sum(w, tl.load(beta_ptr), temperature, gaps_ptr, mids_ptr, offset, N_SIG)
    y = tl.load(alpha_ptr) * value
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(gy_ptr, w_ptr, gw_ptr, ga_ptr, gb_ptr, alpha_ptr, beta_ptr, gaps_ptr, mids_ptr, offset,
                     temperature, n, N_SIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr)
    beta = tl.load(beta_ptr)
    value, slope = _sigmoid_sum(w, beta, temperature, gaps_ptr, mids_ptr, offset, N_SIG)
    tl.store(gw_ptr + offs, (gy * alpha * beta * temperature * slope).to(gw_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(ga_ptr, tl.sum(tl.where(mask, gy * value, 0.0), axis=0))
    tl.atomic_add(gb_ptr, tl.sum(tl.where(mask, gy * alpha * w * temperature * slope, 0.0), axis=0))


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float):
    w = w.contiguous()
    y = torch.empty_like(w)
    _forward_kernel[_grid(w.numel())](w, y, alpha, beta, gaps, mids, offset, temperature, w.numel(),
                                      N_SIG=gaps.numel(), BLOCK=BLOCK)
    return y


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    grad_y, w, grad_w, grad_a, grad_b = backward_buffers(grad_y, w)
    _backward_kernel[_grid(w.numel())](grad_y, w, grad_w, grad_a, grad_b, alpha, beta, gaps, mids, offset,
                                       temperature, w.numel(), N_SIG=gaps.numel(), BLOCK=BLOCK)
    return grad_w, grad_a, grad_b
