"""Multi-step neuron in plain PyTorch: the specification every kernel is tested against.

A Python loop over T of SpikingJelly 2.0's single-step equations (see
csrc/common/neuron_math.h), differentiable through the surrogate spike, in float32 (or
float64 for gradcheck). Shapes: x_seq [T, *], v_init [*] (float32/64) or empty: the
default V[-1] = v_reset (0 for the soft reset) in every column; an empty grad_v_last is
dL/dV[T-1] = 0, and the gradient of an empty v_init is empty.
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
    v = v_init.to(cdt) if v_init.numel() else torch.full(x_seq.shape[1:], vr, dtype=cdt, device=x_seq.device)
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
    has_v0 = v_init.numel() > 0
    with torch.enable_grad():
        x = x_seq.detach().requires_grad_()
        v0 = v_init.detach().requires_grad_(has_v0)
        k = decay.detach().requires_grad_(need_grad_decay)
        spike, v_last, _ = forward(x, v0, k, p)
        wrt = [x] + [v0] * has_v0 + [k] * need_grad_decay
        outputs, grad_outputs = [spike], [grad_spike]
        if grad_v_last.numel():
            outputs.append(v_last)
            grad_outputs.append(grad_v_last)
        grads = iter(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
        grad_x = next(grads)
        grad_v0 = next(grads) if has_v0 else torch.empty_like(v_init)
        grad_k = next(grads) if need_grad_decay else None
    return grad_x, grad_v0, torch.zeros_like(decay) if grad_k is None else grad_k
