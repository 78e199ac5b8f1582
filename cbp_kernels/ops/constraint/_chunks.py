"""The launch table of the multi-tensor constraint kernels (`triton`, `cupy`; the `cuda`
launcher builds the same in C++): ONE int64 tensor, copied to the device in one transfer,

    [ numel[L] | w[L] | lambda[L] | grad[L] | lambda_grad[L] | chunk_layer[C] | chunk_start[C] ]

the layers' sizes and base addresses (0 where an optional list is absent), then the chunks:
chunk c covers weights ``chunk_start[c] .. + chunk`` (clipped to numel) of ``chunk_layer[c]``.
The multiplier step passes its exp_avgs / exp_avg_sqs in the grad / lambda_grad columns.
Layout documented with the kernels in csrc/cuda/constraint.cuh."""
from __future__ import annotations

import torch


def launch_table(weights, lambdas, grads, lambda_grads, chunk: int) -> tuple[torch.Tensor, int]:
    """``(table on the weights' device, number of chunks C)``."""
    n_layers = len(weights)

    def addresses(tensors):
        return torch.tensor([t.data_ptr() for t in tensors] if tensors else [0] * n_layers, dtype=torch.int64)

    numels = torch.tensor([w.numel() for w in weights], dtype=torch.int64)
    per_layer = (numels + chunk - 1) // chunk
    chunk_layer = torch.repeat_interleave(torch.arange(n_layers), per_layer)
    first = torch.cumsum(per_layer, 0) - per_layer  # each layer's first chunk
    chunk_start = (torch.arange(chunk_layer.numel()) - first[chunk_layer]) * chunk
    table = torch.cat([numels, addresses(weights), addresses(lambdas), addresses(grads), addresses(lambda_grads),
                       chunk_layer, chunk_start])
    device = weights[0].device
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, chunk_layer.numel()
