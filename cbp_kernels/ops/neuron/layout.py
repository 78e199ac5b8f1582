"""The [T, N] views and output buffers the GPU backends (triton, cupy) hand to their kernels:
inputs flattened to [T, N] (N = all trailing dims) and made contiguous, outputs allocated
flat; ``restore_*`` gives the results their callers' shapes."""
from __future__ import annotations

import torch


def forward_buffers(x_seq, v_init):
    """(x [T, N], v_init [N], spike [T, N], v_last [N] float32, h [T, N])."""
    T = x_seq.shape[0]
    x = x_seq.reshape(T, -1).contiguous()
    v_last = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    return x, v_init.reshape(-1).contiguous(), torch.empty_like(x), v_last, torch.empty_like(x)


def backward_buffers(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, need_grad_decay):
    """(grad_spike, grad_v_last, h, spike, x, v_init) flat and contiguous, then the outputs
    (grad_x [T, N], grad_v_init [N] float32); x is h (a valid address, never read) unless
    ``need_grad_decay``."""
    T = h_seq.shape[0]
    h = h_seq.reshape(T, -1).contiguous()
    x = x_seq.reshape(T, -1).contiguous() if need_grad_decay else h
    grad_v_init = torch.empty(h.shape[1], dtype=torch.float32, device=h.device)
    return (grad_spike.reshape(T, -1).contiguous(), grad_v_last.reshape(-1).contiguous(), h,
            spike_seq.reshape(T, -1).contiguous(), x, v_init.reshape(-1).contiguous(), torch.empty_like(h),
            grad_v_init)
