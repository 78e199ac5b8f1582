"""The `cupy` backend of the bit-packed convolution: the CUDA-core kernel of
csrc/cuda/bitconv.cuh (``bitconv_popc_kernel``, the same source the `cuda` backend
compiles) JIT-compiled by CuPy. Same signature as ``reference``."""
from __future__ import annotations

import cupy
import numpy as np
import torch

from ..bitpack.cupy import as_cupy, launch
from .reference import output_size

# cbp::BitConvGeometry (csrc/common/bitconv_math.h): 17 int64 fields, in order.
_GEOMETRY = np.dtype([(name, np.int64) for name in (
    "N", "H", "W", "OH", "OW", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "groups", "words_per_group", "out_per_group", "planes")])


def conv2d(x, planes, scale: float, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    N, H, W, _ = x.shape
    P, O, KH, KW, Wg = planes.shape
    OH, OW = output_size(H, W, KH, KW, stride, padding, dilation)
    out = torch.empty(N, OH, OW, O, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    geometry = np.array(
        (N, H, W, OH, OW, KH, KW, *stride, *padding, *dilation, groups, Wg, O // groups, P), dtype=_GEOMETRY
    )[()]
    bias_arg = as_cupy(bias.contiguous()) if bias is not None else cupy.uint64(0)  # a null pointer
    launch("bitconv_popc_kernel", out.numel(), as_cupy(x), as_cupy(planes), bias_arg, cupy.float32(scale),
           as_cupy(out), geometry)
    return out
