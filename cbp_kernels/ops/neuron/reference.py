"""Multi-step neuron in plain PyTorch: the specification every kernel is tested against.

A Python loop over T of SpikingJelly 2.0's single-step equations (see
csrc/common/neuron_math.h), differentiable through the surrogate spike, in float32 (or
float64 for gradcheck). Shapes: x_seq [T, *], v_init [*] (float32/64).
"""
from __future__ import annotations

import torch

from .params import NeuronParams
from .surrogate import SpikeFn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x_seq: torch.Tensor, v_init: torch.Tensor, decay: torch.Tensor, p: NeuronParams):
    """Returns (spike_seq [T, *] in x's dtype, v_last [*] float32, h_seq [T, *] in x's dtype)."""
    cdt = _compute_dtype(x_seq.dtype)
    k = decay.to(cdt)
    vr = p.reset_value
    v = v_init.to(cdt)
    spikes, hs = [], []
    for x in x_seq.to(cdt).unbind(0):
        if p.kind == 0:
            h = v + x
        elif p.decay_input:
            h = v + (vr - v + x) * k
        else:
            h = v + (vr - v) * k + x
        s = SpikeFn.apply(h - p.v_threshold, p.surrogate, p.alpha)
        s_r = s.detach() if p.detach_reset else s
        v = h - p.v_threshold * s_r if p.soft_reset else h * (1 - s_r) + vr * s_r
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes).to(x_seq.dtype), v, torch.stack(hs).to(x_seq.dtype)


def backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p: NeuronParams, need_grad_decay):
    """Gradients (x_seq, v_init, decay) of the reference forward, by autograd on a replay."""
    with torch.enable_grad():
        x = x_seq.detach().requires_grad_()
        v0 = v_init.detach().requires_grad_()
        k = decay.detach().requires_grad_(need_grad_decay)
        spike, v_last, _ = forward(x, v0, k, p)
        inputs = (x, v0, k) if need_grad_decay else (x, v0)
        grads = torch.autograd.grad((spike, v_last), inputs, (grad_spike, grad_v_last), allow_unused=True)
    grad_k = grads[2] if need_grad_decay else torch.zeros_like(decay)
    return grads[0], grads[1], grad_k
