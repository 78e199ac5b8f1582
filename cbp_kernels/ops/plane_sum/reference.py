"""The integer forward's epilogue in plain PyTorch: the specification the kernel is tested
against (and the path on CUDA). The plane sum is exact in float32 (integers below 2^24), the
product by the scale rounded once, written NCHW through a permuted view of the NHWC sum."""
from __future__ import annotations

import torch


def plane_sum_nchw(counts, planes: int, scale):
    """counts float32 ``[P*N, OH, OW, O]``, scale float32 0-dim -> float32 ``[N, O, OH, OW]``."""
    N = counts.shape[0] // planes
    c = counts[:N]
    for b in range(1, planes):  # integers below 2^24: every sum exact in float32
        c = torch.add(c, counts[b * N:(b + 1) * N], alpha=float(1 << b))
    out = torch.empty(N, c.shape[3], c.shape[1], c.shape[2], dtype=torch.float32, device=counts.device)
    torch.mul(c.permute(0, 3, 1, 2), scale.reshape(()), out=out)  # float32(c) * s, rounded once, written NCHW
    return out
