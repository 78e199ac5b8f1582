"""MaxPool2d against torch.nn.MaxPool2d: values and input gradients bit for bit (spikes, ties,
random floats; pooling shapes of the models and odd ones; NCHW and channels-last input;
float32 and bfloat16), and what its training keeps for the backward (the argmax alone); the
stems' pool op ``ops.max_pool2d_3x3s2`` against its reference (ATen), NaN and infinities
included, with and without AVX-512."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.nn import MaxPool2d
from cbp_kernels.ops.max_pool import has_cpu_kernel, max_pool2d_3x3s2, max_pool2d_3x3s2_backward

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


@pytest.mark.skipif(not has_cpu_kernel(), reason="needs the compiled CPU kernel (make build)")
@pytest.mark.parametrize("no_avx512", ["0", "1"])
def test_max_pool_op_is_atens_values_and_argmax(no_avx512, monkeypatch):
    """Values and int16 argmax bitwise ATen's (the reference) on planes from 1x1 to 2^15 cells,
    widths around the 16-output blocks, ties (spikes, all -inf: the first cell wins), +-inf and
    NaN (ATen takes the last NaN of a window); the backward from that argmax bitwise ATen's
    (a cell shared by up to four windows sums their gradients in output order)."""
    monkeypatch.setenv("CBP_KERNELS_NO_AVX512", no_avx512)
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 1, 1), (1, 2, 2), (3, 5, 7), (2, 9, 31), (2, 33, 34), (1, 3, 65), (2, 112, 112), (1, 128, 256)]
    for shape in shapes:
        floats = torch.randn(shape, generator=gen)
        specials = floats.clone()
        pick = torch.rand(shape, generator=gen)
        specials[pick < 0.06] = float("nan")
        specials[(pick >= 0.06) & (pick < 0.12)] = float("inf")
        specials[(pick >= 0.12) & (pick < 0.3)] = float("-inf")
        spikes = (torch.rand(shape, generator=gen) > 0.7).float()
        for x in (floats, specials, spikes, torch.full(shape, float("-inf"))):
            y, idx = max_pool2d_3x3s2(x, backend="cpu")
            y_ref, idx_ref = max_pool2d_3x3s2(x, backend="reference")
            assert idx.dtype == torch.int16 and torch.equal(idx, idx_ref), shape
            assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(0.5), y_ref.nan_to_num(0.5)), shape
            # the backward: gradients of mixed magnitudes (the order of the additions shows)
            g = torch.randn(y.shape, generator=gen) * 10.0 ** torch.randint(-6, 7, y.shape, generator=gen)
            grad = max_pool2d_3x3s2_backward(g, idx, *shape[1:], backend="cpu")
            assert torch.equal(grad, max_pool2d_3x3s2_backward(g, idx, *shape[1:], backend="reference")), shape


def test_max_pool_op_bad_input():
    with pytest.raises(ValueError, match="H \\* W"):
        max_pool2d_3x3s2(torch.zeros(1, 200, 200))
    with pytest.raises(ValueError, match="contiguous"):
        max_pool2d_3x3s2(torch.zeros(2, 9, 8).transpose(1, 2))
    with pytest.raises(TypeError, match="float32"):
        max_pool2d_3x3s2(torch.zeros(2, 8, 8, dtype=torch.float64))
    g, idx = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int16)
    with pytest.raises(ValueError, match="height / width"):
        max_pool2d_3x3s2_backward(g, idx, 9, 9)
    with pytest.raises(ValueError, match="one shape"):
        max_pool2d_3x3s2_backward(g, idx[:1], 8, 8)
    with pytest.raises(TypeError, match="int16"):
        max_pool2d_3x3s2_backward(g, idx.long(), 8, 8)
