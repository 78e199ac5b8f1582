"""``ops.conv_weight_grad`` (the weight gradient of a convolution on integer inputs, AMX-BF16 on
CPUs that have it) against float64 truth: every SEW-ResNet-18 layer shape at small sizes, odd
channel counts and geometries (hypothesis), grad_y spanning 2^-60..2^20 with exact zeros, the
exactness of the three-part split, the float32 fallback (CBP_KERNELS_NO_AMX=1), validation.

The accuracy rule: |got - truth| <= 2 * K * 2^-24 * (the same gradient of |grad_y| and |x|),
K = N * OH * OW products per output, truth in float64 (every product exact); ATen's float32
op meets it too (asserted: the bound is not loose)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbp_kernels.ops.conv_weight_grad import conv_weight_grad, has_cpu_kernel
from cbp_kernels.ops.conv_weight_grad import reference

pytestmark = pytest.mark.skipif(not has_cpu_kernel(), reason="needs the extension's CPU kernel (make build)")

PATHS = ["amx", "fallback"]  # "amx": whatever the machine has (AMX-BF16 where usable); "fallback": ATen float32


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1")
    return request.param


def _truth(grad_y, x, k, s, p, dtype=torch.float64):
    k, s, p = ((v, v) if isinstance(v, int) else v for v in (k, s, p))
    return reference.conv_weight_grad(grad_y.to(dtype), x.to(dtype), k, s, p)


def _inputs(N, C, O, H, W, k, s, p, gen, *, input_max=2, span=(-60, 20)):
    """x integers 0..input_max (spikes for 1, SEW sums for 2); grad_y of magnitudes 2^span[0] ..
    2^span[1] with ~10% exact zeros."""
    x = torch.randint(0, input_max + 1, (N, C, H, W), generator=gen).float()
    OH, OW = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
    scale = torch.exp2(torch.randint(span[0], span[1] + 1, (N, O, OH, OW), generator=gen).float())
    g = torch.randn(N, O, OH, OW, generator=gen) * scale
    g[torch.rand(g.shape, generator=gen) < 0.1] = 0.0
    return g, x


def check_accuracy(g, x, k, s, p, **kw):
    got = conv_weight_grad(g, x, k, s, p, **kw)
    truth = _truth(g, x, k, s, p)
    assert got.dtype == torch.float32 and got.shape == truth.shape
    K = g.shape[0] * g.shape[2] * g.shape[3]
    bound = 2 * K * 2.0**-24 * _truth(g.abs(), x.abs(), k, s, p)
    ref32 = _truth(g, x, k, s, p, torch.float32).double()
    assert bool(((ref32 - truth).abs() <= bound).all()), "ATen's float32 op misses the bound: the rule is wrong"
    err = (got.double() - truth).abs()
    bad = err > bound
    assert not bool(bad.any()), (f"{int(bad.sum())} of {bad.numel()} gradients beyond the float32 bound, first at "
                                 f"{bad.nonzero()[0].tolist()}: got {got.flatten()[bad.flatten()][0].item()}, "
                                 f"truth {truth.flatten()[bad.flatten()][0].item()}")
    return got


# SEW-ResNet-18's convolutions after the stem (C, O, kernel, stride, padding) at small sizes.
SEW18 = [(64, 64, 3, 1, 1), (64, 128, 3, 2, 1), (64, 128, 1, 2, 0), (128, 128, 3, 1, 1), (128, 256, 3, 2, 1),
         (128, 256, 1, 2, 0), (256, 256, 3, 1, 1), (256, 512, 3, 2, 1), (256, 512, 1, 2, 0), (512, 512, 3, 1, 1)]


@pytest.mark.parametrize("C, O, k, s, p", SEW18, ids=[f"{c}-{o}-k{k}s{s}" for c, o, k, s, _ in SEW18])
def test_sew_resnet18_layers(C, O, k, s, p, path):
    gen = torch.Generator().manual_seed(C + O + k + s)
    for N, H in [(1, 7), (3, 9)] if C >= 256 else [(2, 13), (5, 8)]:
        g, x = _inputs(N, C, O, H, H, (k, k), (s, s), (p, p), gen)
        check_accuracy(g, x, k, s, p)


# Odd channel counts (not multiples of 16 or 32), rectangular kernels / strides / paddings.
ODD = [(2, 3, 20, 17, 11, (3, 3), (1, 1), (1, 1)), (3, 20, 48, 11, 13, (3, 3), (2, 2), (1, 1)),
       (1, 48, 3, 9, 16, (3, 2), (1, 2), (0, 1)), (4, 33, 17, 8, 7, (5, 5), (3, 2), (2, 2)),
       (2, 17, 40, 15, 9, (1, 1), (1, 1), (0, 0)), (1, 5, 7, 3, 3, (3, 3), (1, 1), (2, 2))]


@pytest.mark.parametrize("shape", ODD, ids=[str(i) for i in range(len(ODD))])
def test_odd_shapes(shape, path):
    N, C, O, H, W, k, s, p = shape
    check_accuracy(*_inputs(N, C, O, H, W, k, s, p, torch.Generator().manual_seed(1)), k, s, p)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 4), C=st.integers(1, 40), O=st.integers(1, 40), H=st.integers(1, 14), W=st.integers(1, 14),
       k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       p=st.tuples(st.integers(0, 2), st.integers(0, 2)), seed=st.integers(0, 2**16))
def test_random_geometry(N, C, O, H, W, k, s, p, seed):
    if H + 2 * p[0] < k[0] or W + 2 * p[1] < k[1]:
        return  # no output pixel
    check_accuracy(*_inputs(N, C, O, H, W, k, s, p, torch.Generator().manual_seed(seed)), k, s, p)


def test_split_is_exact(path):
    """One product per gradient (1x1 input and kernel): grad_w = float32(g * x) (g * x for x = 1,
    2; 3 g rounded once) for every g whose three bfloat16 parts are normal (|g| >= 2^-103: 24
    significant bits, random mantissas, both signs); below, AMX loses the parts under 2^-126
    (the documented bound)."""
    gen = torch.Generator().manual_seed(3)
    O, C = 64, 4
    e = torch.randint(-126, 127, (1, O, 1, 1), generator=gen).float()
    g = (1 + torch.rand(1, O, 1, 1, generator=gen)) * torch.exp2(e) * torch.where(torch.rand(1, O, 1, 1) < 0.5, -1, 1)
    x = torch.tensor([1.0, 2.0, 3.0, 0.0]).view(1, C, 1, 1)
    got = conv_weight_grad(g, x, 1).view(O, C).double()
    truth = (g.view(O, 1).double() * x.view(1, C).double()).float().double()
    normal = g.view(O).abs() >= 2.0**-103
    assert torch.equal(got[normal], truth[normal])
    assert bool(((got - truth).abs() <= 2.0**-124 * x.view(1, C) + truth.abs() * 2.0**-24).all())


def test_fallback_is_atens_float32(monkeypatch):
    """CBP_KERNELS_NO_AMX=1: the kernel runs ATen's float32 op, bit for bit."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1")
    g, x = _inputs(2, 20, 24, 10, 10, (3, 3), (2, 2), (1, 1), torch.Generator().manual_seed(4), span=(-4, 4))
    assert torch.equal(conv_weight_grad(g, x, 3, 2, 1), _truth(g, x, (3, 3), (2, 2), (1, 1), torch.float32))


def test_non_contiguous_inputs():
    g, x = _inputs(2, 24, 16, 9, 9, (3, 3), (1, 1), (1, 1), torch.Generator().manual_seed(5), input_max=1)
    got = check_accuracy(g.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                         3, 1, 1)
    assert torch.equal(got, conv_weight_grad(g, x, 3, 1, 1))


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 3, 8)), "4-D"),
    (dict(grad_y=torch.zeros(2, 4, 7, 8)), "grad_y must have shape"),
    (dict(grad_y=torch.zeros(3, 4, 8, 8)), "grad_y must have shape"),
    (dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.float64)), "x must have dtype"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(stride=(1, 0)), "stride"),
    (dict(padding=-1), "padding"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(grad_y=torch.zeros(2, 4, 8, 8), x=torch.zeros(2, 3, 8, 8), kernel_size=3, stride=1, padding=1) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        conv_weight_grad(**args)


def test_same_bits_on_any_thread_count():
    """Threads split the items differently; each item keeps one order over k: grad_w is bitwise
    the same on 1, 2 and 3 threads."""
    g, x = _inputs(3, 40, 70, 12, 12, (3, 3), (1, 1), (1, 1), torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(conv_weight_grad(g, x, 3, 1, 1))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("shape", [(2, 20, 24, 11, 11, (3, 3), (1, 1), (1, 1)), (3, 33, 40, 12, 9, (3, 3), (2, 2), (1, 1)),
                                   (2, 40, 17, 14, 14, (1, 1), (2, 2), (0, 0)), (1, 5, 9, 10, 13, (3, 2), (3, 2), (1, 0))],
                         ids=["s1", "s2", "1x1s2", "s3x2"])
def test_uint8_input_is_the_float_one(shape, path):
    """x as uint8 (e.g. a layer's saved 8-bit copy of SEW sums): the same bits as x in float32."""
    N, C, O, H, W, k, s, p = shape
    g, x = _inputs(N, C, O, H, W, k, s, p, torch.Generator().manual_seed(7), input_max=255)
    got = conv_weight_grad(g, x.to(torch.uint8), k, s, p)
    assert got.dtype == torch.float32
    assert torch.equal(got, conv_weight_grad(g, x, k, s, p))
    check_accuracy(g, x, k, s, p)
