"""The convolution gradients of SEW-ResNet-18's spiking layers on AMX-BF16 against ATen's float32,
one at a time: the input gradient ``conv_input_grad`` (from grad_y and the levels q, the scale
as alpha, or a float32 weight) and the weight gradient ``conv_weight_grad`` (from grad_y and the
input spikes).

Layers: the spiking convolutions of SEW-ResNet-18 at ImageNet size, batch 8 x T = 4 (N = 32
images), NCHW float32; one thread and every core. Providers: ``cbp_kernels`` (role "ours") and
``aten_float32`` (role "baseline": ``aten.convolution_backward`` with the output mask selecting
only that gradient). ``extra_info`` holds the layer, provider, role, threads
and MACs.

``test_conv2d_integer_input``: the forward of the stride-1 layers on spikes {0, 1} (~20% firing)
with float32 weights, ``conv2d_integer_input`` (the input gradient's kernel: x's one bfloat16 part
times the weight's three) vs ``F.conv2d`` (provider "aten_float32", role "baseline").

Run: ``python -m pytest -q bench/bench_conv_grad.py --benchmark-json=OUT.json``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbp_kernels.ops.conv_input_grad import conv2d_integer_input, conv_input_grad
from cbp_kernels.ops.conv_weight_grad import conv_weight_grad

from bench_bitconv import LAYERS as BITCONV_LAYERS
from harness import num_threads, run, thread_counts

N = 32  # batch 8 x T = 4
SCALE = 0.0371
# SEW-ResNet-18's spiking convolutions (name, C_in, C_out, input H = W, kernel, stride); padding kernel // 2.
LAYERS = [layer for layer in BITCONV_LAYERS if layer[0].startswith("sew18.")]
ROLES = {"cbp_kernels": "ours", "aten_float32": "baseline"}


def _case(layer):
    name, C, O, H, k, stride = layer
    pad = k // 2
    OH = (H + 2 * pad - k) // stride + 1
    torch.manual_seed(0)
    return name, C, O, H, k, stride, pad, torch.randn(N, O, OH, OH)


def _run(benchmark, fn, name, provider, threads, macs, **info):
    with num_threads(threads):
        run(benchmark, fn, rounds=5, warmup=1, layer=name, provider=provider, role=ROLES[provider], threads=threads,
            batch=N, macs=macs, **info)


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("provider", list(ROLES))
@pytest.mark.parametrize("weights", ["levels", "float"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
def test_conv_input_grad(benchmark, layer, weights, provider, threads):
    """grad_x of a layer from grad_y and the weight: the levels q (scale s as alpha, one
    bfloat16 part: 3 products per MAC) or a float32 weight w (three parts: 6 products):
    ``conv_input_grad`` vs ``aten.convolution_backward(grad_y, x, s * q or w, ...,
    [True, False, False])``."""
    name, C, O, H, k, stride, pad, grad_y = _case(layer)
    q = torch.randint(-1, 2, (O, C, k, k)).float()
    if weights == "float":
        q = torch.randn(O, C, k, k) * SCALE  # not exact in bfloat16; alpha 1 below
    alpha = SCALE if weights == "levels" else 1.0
    if provider == "cbp_kernels":
        fn = lambda: conv_input_grad(grad_y, q, (H, H), stride, pad, alpha)  # noqa: E731
    else:
        x, w = torch.empty(N, C, H, H), q * alpha
        fn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            grad_y, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [True, False, False])
    benchmark.group = f"conv_input_grad {name} {weights} {threads}thr"
    _run(benchmark, fn, name, provider, threads, N * C * O * k * k * grad_y.shape[-1] ** 2, weights=weights)


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("provider", list(ROLES))
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
def test_conv_weight_grad(benchmark, layer, provider, threads):
    """grad_w of a layer from grad_y and its input spikes x (~20% firing): ``conv_weight_grad``
    vs ``aten.convolution_backward(grad_y, x, w, ..., [False, True, False])``."""
    name, C, O, H, k, stride, pad, grad_y = _case(layer)
    x = (torch.rand(N, C, H, H) < 0.2).float()
    if provider == "cbp_kernels":
        fn = lambda: conv_weight_grad(grad_y, x, k, stride, pad)  # noqa: E731
    else:
        w = torch.empty(O, C, k, k)  # only its shape is read
        fn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            grad_y, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False])
    benchmark.group = f"conv_weight_grad {name} {threads}thr"
    _run(benchmark, fn, name, provider, threads, N * C * O * k * k * grad_y.shape[-1] ** 2)


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("provider", list(ROLES))
@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer[-1] == 1], ids=lambda layer: layer[0])
def test_conv2d_integer_input(benchmark, layer, provider, threads):
    """y of a stride-1 layer from its input spikes x and a float32 weight: ``conv2d_integer_input``
    vs ``F.conv2d``."""
    name, C, O, H, k, stride, pad, _ = _case(layer)
    x = (torch.rand(N, C, H, H) < 0.2).float()
    w = torch.randn(O, C, k, k) * SCALE
    if provider == "cbp_kernels":
        fn = lambda: conv2d_integer_input(x, w, pad)  # noqa: E731
    else:
        fn = lambda: F.conv2d(x, w, padding=pad)  # noqa: E731
    benchmark.group = f"conv2d_integer_input {name} {threads}thr"
    _run(benchmark, fn, name, provider, threads, N * C * O * k * k * H * H)
