"""The `cupy` backend: the CUDA kernels of csrc/cuda/neuron.cuh compiled at run time by
CuPy's NVRTC (for an extension built without CUDA). Same kernels, grid and float32 math as
the `cuda` backend, launched on torch's current stream; tensors cross by DLPack (zero copy).
Same signature as ``reference``; CUDA tensors only.
"""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import dtype_suffix, launch
from .layout import backward_buffers, forward_buffers
from .params import NeuronParams

THREADS = 256  # kNeuronThreads in csrc/cuda/neuron.cuh


def kernel_name(direction: str, dtype: torch.dtype) -> str:
    """The extern "C" kernel of csrc/cuda/neuron.cuh for ``direction`` ("forward"/"backward") and storage dtype."""
    return f"neuron_{direction}_{dtype_suffix(dtype)}"


def _blocks(n: int) -> int:
    """The grid: one thread per column of n."""
    return (n + THREADS - 1) // THREADS


def _launch(direction: str, dtype: torch.dtype, device: torch.device, n: int, args: tuple) -> None:
    """One thread per column of n; tensors pass by address, the rest as NumPy scalars of the kernel's types."""
    if n:
        launch("neuron", kernel_name(direction, dtype), device, _blocks(n), THREADS, args)


def forward(x_seq, v_init, decay, p: NeuronParams):
    """Returns (spike_seq [T, *] in x's dtype, v_last [*] float32, h_seq [T, *] in x's dtype)."""
    x, v0, spike, v_last, h = forward_buffers(x_seq, v_init)
    T, N = x.shape
    _launch("forward", x.dtype, x.device, N, (
        x, v0, decay.reshape(1).float(), spike, v_last, h, np.int64(T), np.int64(N),
        np.float32(p.v_threshold), np.float32(p.reset_value), np.int32(p.kind), np.int32(p.soft_reset),
        np.int32(p.decay_input),
    ))
    return spike.view(x_seq.shape), v_last.view(x_seq.shape[1:]), h.view(x_seq.shape)


def backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p: NeuronParams, need_grad_decay):
    """Gradients (x_seq, v_init, decay); x_seq is read only when need_grad_decay (else it may be empty)."""
    gs, gvl, h, s, x, v0, grad_x, grad_v_init = backward_buffers(grad_spike, grad_v_last, h_seq, spike_seq, x_seq,
                                                                 v_init, need_grad_decay)
    T, N = h.shape
    # PLIF's dL/dk: one float64 partial per block, added up here and rounded once to float32.
    partial = torch.empty(_blocks(N) if need_grad_decay else 0, dtype=torch.float64, device=h.device)
    _launch("backward", h.dtype, h.device, N, (
        gs, gvl, h, s, x, v0, decay.reshape(1).float(),
        grad_x, None if v0 is None else grad_v_init, partial if need_grad_decay else None, np.int64(T), np.int64(N),
        np.float32(p.v_threshold), np.float32(p.reset_value),
        np.int32(p.kind), np.int32(p.soft_reset), np.int32(p.decay_input), np.int32(p.detach_reset),
        np.int32(p.surrogate), np.float32(p.alpha), np.int32(need_grad_decay),
    ))
    grad_decay = partial.sum().to(torch.float32)
    return grad_x.view(h_seq.shape), grad_v_init.view(v_init.shape), grad_decay.to(decay.dtype).reshape(decay.shape)
