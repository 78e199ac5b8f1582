"""The `cpu` and `cuda` backends: the extension's kernels (csrc/cpu/neuron.cpp,
csrc/cuda/neuron.cu), chosen by the dispatcher from the tensors' device. Same signature
as ``reference``."""
from __future__ import annotations

import torch

from .params import NeuronParams


def forward(x_seq, v_init, decay, p: NeuronParams):
    return tuple(
        torch.ops.cbp_kernels_ext.neuron_forward(
            x_seq, v_init, decay, p.v_threshold, p.reset_value, p.soft_reset, p.kind, p.decay_input
        )
    )


def backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p: NeuronParams, need_grad_decay):
    return tuple(
        torch.ops.cbp_kernels_ext.neuron_backward(
            grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p.v_threshold, p.reset_value,
            p.soft_reset, p.kind, p.decay_input, p.detach_reset, p.surrogate, p.alpha, need_grad_decay,
        )
    )
