"""The `cpu` and `cuda` backends: the extension's kernels (csrc/cpu/bitconv.cpp,
csrc/cuda/bitconv.cu), chosen by the dispatcher from the tensors' device. Same signature
as ``reference``."""
from __future__ import annotations

import torch

from ..neuron.params import NeuronParams


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    return torch.ops.cbp_kernels_ext.bitconv2d(x, planes, scale, bias, stride, padding, dilation, groups)


def conv2d_lif(x, planes, mul, add, stride, padding, dilation, groups: int, T: int, decay: float, p: NeuronParams):
    spikes, v_last = torch.ops.cbp_kernels_ext.bitconv2d_lif(
        x, planes, mul, add, stride, padding, dilation, groups, T, decay, p.v_threshold, p.reset_value,
        p.soft_reset, p.kind, p.decay_input,
    )
    return spikes, v_last
