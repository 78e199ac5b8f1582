"""The `cpu` backend: the extension's kernel (csrc/cpu/batch_norm_stats.cpp); CPU only (see
``op.py``). Same signature as ``reference``."""
from __future__ import annotations

import torch


def batch_norm_stats(x, running_mean, running_var, momentum: float, eps: float):
    return tuple(torch.ops.cbp_kernels_ext.batch_norm_stats(x, running_mean, running_var, momentum, eps))
