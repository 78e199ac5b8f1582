"""The [T, N] views and output buffers the GPU backends (triton, cupy) hand to their kernels:
inputs flattened to [T, N] (N = all trailing dims) and made contiguous, outputs allocated
flat (the backends view them back to their callers' shapes).

The [N] states ``v_init`` and ``grad_v_last`` may be empty: the op's defaults (V[-1] = v_reset,
dL/dV[T-1] = 0), which the kernels apply without reading a tensor. They come back as None
here, and ``grad_v_init`` is then empty too (nothing to differentiate)."""
from __future__ import annotations

import torch


def _optional_state(state):
    """An [N] state flat and contiguous, or None when it is empty (the op's default)."""
    return state.reshape(-1).contiguous() if state.numel() else None


def forward_buffers(x_seq, v_init):
    """(x [T, N], v_init [N] or None, spike [T, N], v_last [N] float32, h [T, N])."""
    T = x_seq.shape[0]
    x = x_seq.reshape(T, -1).contiguous()
    v_last = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    return x, _optional_state(v_init), torch.empty_like(x), v_last, torch.empty_like(x)


def backward_buffers(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, need_grad_decay):
    """(grad_spike, grad_v_last or None, h, spike, x, v_init or None) flat and contiguous, then the
    outputs (grad_x [T, N], grad_v_init [N] float32, [0] when v_init is empty); x is h (a valid
    address, never read) unless ``need_grad_decay``."""
    T = h_seq.shape[0]
    h = h_seq.reshape(T, -1).contiguous()
    x = x_seq.reshape(T, -1).contiguous() if need_grad_decay else h
    v0 = _optional_state(v_init)
    grad_v_init = torch.empty(h.shape[1] if v0 is not None else 0, dtype=torch.float32, device=h.device)
    return (grad_spike.reshape(T, -1).contiguous(), _optional_state(grad_v_last), h,
            spike_seq.reshape(T, -1).contiguous(), x, v0, torch.empty_like(h), grad_v_init)
