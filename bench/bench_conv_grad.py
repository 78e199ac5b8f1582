"""The gradients of SEW-ResNet-18's quantized convolutions (the backward of the CBP training
step) on AMX-BF16 against ATen's float32 ``convolution_backward``, one gradient at a time.

Layers: the spiking convolutions of SEW-ResNet-18 at ImageNet size, batch 8 x T = 4 (N = 32
images), NCHW float32; one thread and every core. Providers: ``cbp_kernels`` (role "ours") and
``aten_float32`` (role "baseline": ``aten.convolution_backward`` with the output mask selecting
only that gradient). ``extra_info`` holds the layer, provider, role, threads and MACs.

``test_conv2d_integer_input``: the forward of the stride-1 layers on spikes {0, 1} with float32
weights, ``conv2d_integer_input`` (the input gradient's kernel, parts 2 and 3 of x skipped) vs
``F.conv2d`` (role "baseline", provider "aten_float32").

Run: ``python -m pytest -q bench/bench_conv_grad.py --benchmark-json=OUT.json``.
"""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from cbp_kernels.ops.conv_input_grad import conv2d_integer_input, conv_input_grad

from bench_bitconv import LAYERS as BITCONV_LAYERS
from harness import num_threads, run, thread_counts

N = 32  # batch 8 x T = 4
SCALE = 0.0371
# SEW-ResNet-18's spiking convolutions (name, C_in, C_out, input H = W, kernel, stride); padding kernel // 2.
LAYERS = [layer for layer in BITCONV_LAYERS if layer[0].startswith("sew18.")]
ROLES = {"cbp_kernels": "ours", "aten_float32": "baseline"}


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("provider", list(ROLES))
@pytest.mark.parametrize("weights", ["levels", "float"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
def test_conv_input_grad(benchmark, layer, weights, provider, threads):
    """grad_x of a layer from grad_y and the weight: the levels q (scale s as alpha, one
    bfloat16 part: 3 products per MAC) or a float32 weight w (three parts: 6 products):
    ``conv_input_grad`` vs ``aten.convolution_backward(grad_y, x, s * q or w, ...,
    [True, False, False])``."""
    name, C, O, H, k, stride = layer
    pad = k // 2
    OH = (H + 2 * pad - k) // stride + 1
    torch.manual_seed(0)
    grad_y = torch.randn(N, O, OH, OH)
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
    with num_threads(threads):
        run(benchmark, fn, rounds=5, warmup=1, layer=name, provider=provider, role=ROLES[provider], threads=threads,
            weights=weights,
            batch=N, macs=N * C * O * k * k * OH * OH)


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("provider", list(ROLES))
@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer[5] == 1], ids=lambda layer: layer[0])
def test_conv2d_integer_input(benchmark, layer, provider, threads):
    """y = conv2d(x, w, padding=k // 2) for spikes x and a float32 weight w: ``conv2d_integer_input``
    vs ``F.conv2d``."""
    name, C, O, H, k, _ = layer
    torch.manual_seed(0)
    x = torch.randint(0, 2, (N, C, H, H)).float()
    w = torch.randn(O, C, k, k) * SCALE
    fn = conv2d_integer_input if provider == "cbp_kernels" else lambda x, w, p: F.conv2d(x, w, padding=p)
    benchmark.group = f"conv2d_integer_input {name} {threads}thr"
    with num_threads(threads):
        run(benchmark, fn, x, w, k // 2, rounds=5, warmup=1, layer=name, provider=provider, role=ROLES[provider],
            threads=threads, batch=N, macs=N * C * O * k * k * H * H)
