"""The multi-tensor launch tables the `triton` and `cupy` backends build on the weights'
device: every layer cut into chunks of ``chunk`` weights, and the layers' base addresses."""
from __future__ import annotations

import torch


def chunk_table(weights, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(numels [L] int64, chunk_layer [C] int32, chunk_start [C] int64)``: chunk c covers
    weights ``chunk_start[c] .. + chunk`` (clipped to numel) of layer ``chunk_layer[c]``."""
    numels = torch.tensor([w.numel() for w in weights], dtype=torch.int64, device=device)
    per_layer = (numels + chunk - 1) // chunk
    chunk_layer = torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32, device=device), per_layer)
    first = torch.cumsum(per_layer, 0) - per_layer  # index of each layer's first chunk
    chunk_start = (torch.arange(chunk_layer.numel(), device=device) - first[chunk_layer]) * chunk
    return numels, chunk_layer, chunk_start


def addresses(tensors, device) -> torch.Tensor:
    """The tensors' base addresses as int64 (one 0 for an empty list: the kernel never reads it)."""
    return torch.tensor([t.data_ptr() for t in tensors] or [0], dtype=torch.int64, device=device)
