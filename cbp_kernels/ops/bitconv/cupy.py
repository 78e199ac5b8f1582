"""The `cupy` backend of the bit-packed convolution: the kernels of csrc/cuda/bitconv.cuh
(``bitconv_popc_kernel``; the fused epilogue ``bitconv_lif_kernel``), the same source the
`cuda` backend compiles, JIT-compiled by CuPy. Same signature as ``reference``."""
from __future__ import annotations

import numpy as np
import torch

from .._cupy import launch_items
from ..neuron.params import NeuronParams
from .reference import Geometry

# cbp::BitConvGeometry (csrc/common/bitconv_math.h): 17 int64 fields, in order.
_GEOMETRY = np.dtype([(name, np.int64) for name in Geometry._fields])


def _geometry(geom: Geometry):
    return np.array(tuple(geom), dtype=_GEOMETRY)[()]


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    geom = Geometry.of(x, planes, stride, padding, dilation, groups)
    out = geom.empty_output(x)
    if out.numel() == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else np.uint64(0)  # a null pointer
    launch_items("bitconv", "bitconv_popc_kernel", x.device, out.numel(), (x.contiguous(), planes.contiguous(),
                 bias_arg, np.float32(scale), out, _geometry(geom)))
    return out


def conv2d_lif(x, planes, mul, add, stride, padding, dilation, groups: int, T: int, decay: float, p: NeuronParams):
    geom = Geometry.of(x, planes, stride, padding, dilation, groups)
    spikes, v_last = geom.empty_lif_outputs(x, T)
    if v_last.numel() == 0:
        return spikes, v_last
    # One thread per output spike word (every word of every timestep is written).
    threads = spikes.shape[-1] * (v_last.numel() // v_last.shape[-1])
    launch_items("bitconv", "bitconv_lif_kernel", x.device, threads, (x.contiguous(), planes.contiguous(),
                 mul.contiguous(), add.contiguous(), _geometry(geom), np.int64(T), np.float32(decay),
                 np.float32(p.v_threshold), np.float32(p.reset_value), np.int32(p.kind), np.int32(p.soft_reset),
                 np.int32(p.decay_input), spikes, v_last))
    return spikes, v_last
