"""MaxPool2d against torch.nn.MaxPool2d: values and input gradients bit for bit (spikes, ties,
random floats; pooling shapes of the models and odd ones; NCHW and channels-last input;
float32 and bfloat16), and what its training keeps for the backward (the argmax alone)."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.nn import MaxPool2d

POOLS = [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2), dict(kernel_size=3, stride=2, ceil_mode=True),
         dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 2))]


def _input(kind: str, shape, dtype, gen):
    if kind == "spikes":
        return (torch.rand(shape, generator=gen) > 0.7).to(dtype)
    if kind == "integers":  # many ties inside a window
        return torch.randint(0, 3, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("pool", POOLS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("kind", ["spikes", "integers", "floats"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_is_torchs_bit_for_bit(pool, kind, layout, dtype):
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 8, 16, 16), (3, 5, 9, 7)]:
        x = _input(kind, shape, dtype, gen)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(torch.nn.MaxPool2d(**pool)(x).shape, generator=gen).to(dtype)
        outs = []
        for module in (torch.nn.MaxPool2d(**pool), MaxPool2d(**pool)):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(grad)
            outs.append((y, xi.grad))
            with torch.no_grad():
                assert torch.equal(module(x), y)  # inference: the same values
        (y_ref, g_ref), (y, g) = outs
        assert y.dtype == y_ref.dtype and y.stride() == y_ref.stride(), (y.stride(), y_ref.stride())
        assert torch.equal(y, y_ref), f"{shape}: pooled values differ"
        differ = int((g != g_ref).sum())
        assert differ == 0, f"{shape}: {differ} input gradients differ"


def test_max_pool_keeps_only_the_argmax():
    """Its training keeps one 16-bit index per output (neither the input nor int64 indices)."""
    x = (torch.rand(4, 8, 112, 112) > 0.5).float().requires_grad_()
    y = MaxPool2d(3, 2, 1)(x)
    saved = y.grad_fn.saved_tensors
    assert [(t.dtype, t.shape) for t in saved] == [(torch.int16, y.shape)]


def test_max_pool_falls_back_to_torch():
    x = torch.rand(8, 9, 9)  # unbatched
    assert torch.equal(MaxPool2d(2)(x), torch.nn.MaxPool2d(2)(x))
    y, idx = MaxPool2d(2, return_indices=True)(x.unsqueeze(0))
    y_ref, idx_ref = torch.nn.MaxPool2d(2, return_indices=True)(x.unsqueeze(0))
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
