"""The `cupy` backend of the bit-packed convolution: the CUDA-core kernel of
csrc/cuda/bitconv.cuh (``bitconv_popc_kernel``, the same source the `cuda` backend
compiles) JIT-compiled by CuPy. Same signature as ``reference``."""
from __future__ import annotations

import numpy as np
import torch

from ..bitpack.cupy import launch_items
from .reference import Geometry

# cbp::BitConvGeometry (csrc/common/bitconv_math.h): 17 int64 fields, in order.
_GEOMETRY = np.dtype([(name, np.int64) for name in Geometry._fields])


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    geom = Geometry.of(x, planes, stride, padding, dilation, groups)
    out = geom.empty_output(x)
    if out.numel() == 0:
        return out
    geometry = np.array(tuple(geom), dtype=_GEOMETRY)[()]
    bias_arg = bias.contiguous() if bias is not None else np.uint64(0)  # a null pointer
    launch_items("bitconv_popc_kernel", x.device, out.numel(), x.contiguous(), planes.contiguous(), bias_arg,
                 np.float32(scale), out, geometry)
    return out
