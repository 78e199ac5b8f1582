"""Sigmoid-sum quantizer in plain PyTorch, the specification of its kernels:

    y = alpha * (sum_i s_i * sigmoid(T * (beta * w - b_i)) - o)

with s_i the gaps between neighbouring levels, b_i their midpoints and o = sum(s_i) / 2
(Quantization Networks, CVPR 2019; seed paper 001). No clamp of T (beta w - b_i): the public
code of Quantization Networks clamps it to [-10, 10], which zeroes the gradient beyond; we
use the paper's sigmoid in a stable form instead (``_sigmoid``). Shapes: w [*] (float32/16/bf16, float64
for gradcheck), alpha and beta 0-dim float32, gaps and mids [n] float32.
"""
from __future__ import annotations

import torch


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    """sigmoid(z) as the kernels compute it: e = exp(-|z|) (never overflows), 1 / (1 + e) for
    z >= 0, e / (1 + e) below; its autograd derivative is e / (1 + e)^2 = sig(z) sig(-z)."""
    e = torch.exp(-z.abs())
    return torch.where(z >= 0, 1 / (1 + e), e / (1 + e))


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float) -> torch.Tensor:
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    z = temperature * (beta.to(cdt) * w.to(cdt).unsqueeze(-1) - mids.to(cdt))
    sig = _sigmoid(z)
    return (alpha.to(cdt) * ((gaps.to(cdt) * sig).sum(-1) - offset)).to(w.dtype)


def backward(grad_y, w, alpha, beta, gaps, mids, offset: float, temperature: float):
    """(grad w, grad alpha, grad beta) of ``forward`` by autograd on a replay."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (w, alpha, beta)]
        y = forward(*leaves, gaps, mids, offset, temperature)
        return torch.autograd.grad(y, leaves, grad_y)


def backward_buffers(grad_y, w):
    """For the kernel backends: (grad_y, w) contiguous, then the outputs grad_w (w's shape and
    dtype) and the float32 accumulators of alpha's and beta's gradients (zeroed)."""
    w = w.contiguous()
    zeros = [torch.zeros((), dtype=torch.float32, device=w.device) for _ in range(2)]
    return grad_y.contiguous(), w, torch.empty_like(w), *zeros


def hard(w, alpha, beta, gaps, mids, offset: float) -> torch.Tensor:
    """The T -> infinity limit used at inference: alpha * (sum_i s_i [beta w > b_i] - o)."""
    steps = (beta * w.unsqueeze(-1) > mids).to(w.dtype)
    return alpha * ((gaps * steps).sum(-1) - offset)
