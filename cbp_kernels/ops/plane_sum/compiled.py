"""The `cpu` backend: the extension's kernel (csrc/cpu/plane_sum.cpp); CPU only (see ``op.py``).
Same signature as ``reference``."""
from __future__ import annotations

import torch


def plane_sum_nchw(counts, planes: int, scale):
    return torch.ops.cbp_kernels_ext.plane_sum_nchw(counts, planes, scale)
