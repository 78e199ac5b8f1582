"""Sigmoid-sum quantizer in plain PyTorch, the specification of its kernels:

    y = alpha * (sum_i s_i * sigmoid(clamp(T * (beta * w - b_i), -10, 10)) - o)

with s_i the gaps between neighbouring levels, b_i their midpoints and o = sum(s_i) / 2
(Quantization Networks, CVPR 2019; seed paper 001). Shapes: w [*] (float32/16/bf16, float64
for gradcheck), alpha and beta 0-dim float32, gaps and mids [n] float32.
"""
from __future__ import annotations

import torch


def forward(w, alpha, beta, gaps, mids, offset: float, temperature: float) -> torch.Tensor:
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    z = temperature * (beta.to(cdt) * w.to(cdt).unsqueeze(-1) - mids.to(cdt))
    sig = torch.sigmoid(z.clamp(-10.0, 10.0))
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
