"""The input gradient of a convolution (``ops.conv_input_grad``) with level weights and with float
weights against float64 truth: every SEW-ResNet-18 layer shape at small spatial sizes, odd
channel counts, other kernels / strides / paddings (hypothesis), gradients spanning 2^-60 .. 2^20
with exact zeros; the bound |got - truth| <= 2 K 2^-24 (alpha |g| * |w| summed), which the
float32 reference also meets, plus 2^-21 times that sum for float weights (the dropped pairs of
parts, csrc/cpu/conv_input_grad.cpp); the exact three-part bfloat16 split and which pairs of
parts a float weight keeps; ATen's float32 path (no AMX) bit for bit the reference's; validation.
``conv2d_integer_input`` (a stride-1 conv2d on the same kernel) against float64 ``F.conv2d`` with
integer and float inputs, the same bounds."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cbp_kernels.ops.conv_input_grad import conv2d_integer_input, conv_input_grad, has_cpu_kernel, reference, split_bf16
from conftest import needs_amx

needs_kernel = pytest.mark.skipif(not has_cpu_kernel(), reason="needs the compiled CPU kernel (make build)")


# (C, O, kernel, stride, padding) of SEW-ResNet-18's convolutions after the stem.
SEW_LAYERS = [(64, 64, 3, 1, 1), (64, 128, 3, 2, 1), (64, 128, 1, 2, 0), (128, 128, 3, 1, 1), (128, 256, 3, 2, 1),
              (128, 256, 1, 2, 0), (256, 256, 3, 1, 1), (256, 512, 3, 2, 1), (256, 512, 1, 2, 0), (512, 512, 3, 1, 1)]


# The float-weight path drops the pairs of parts g2 w3, g3 w2, g3 w3: below 2^-21 |g w| per product.
DROPPED = {"levels": 0.0, "float": 2.0**-21}


def _levels(O, C, KH, KW, gen):
    return torch.randint(-1, 2, (O, C, KH, KW), generator=gen).float()


def _floats(O, C, KH, KW, gen):
    """Weights not exact in bfloat16 (all 24 bits used), magnitudes 2^-12 .. 2^8 and exact zeros."""
    w = torch.randn(O, C, KH, KW, generator=gen, dtype=torch.float64)
    w = w * torch.exp2(torch.empty_like(w).uniform_(-10, 6, generator=gen))
    w[torch.rand(w.shape, generator=gen) < 0.1] = 0
    return w.float()


WEIGHTS = {"levels": _levels, "float": _floats}


def _grad(N, O, OH, OW, gen, spread=False):
    g = torch.randn(N, O, OH, OW, generator=gen, dtype=torch.float64)
    if spread:  # magnitudes 2^-60 .. 2^20 and exact zeros
        g = g.sign() * torch.exp2(torch.empty_like(g).uniform_(-60, 20, generator=gen)) * (1 + torch.rand_like(g))
        g[torch.rand(g.shape, generator=gen) < 0.2] = 0
    return g.float()


def _check(g, w, size, stride, padding, alpha=0.37, dropped=0.0):
    """The op against float64 truth within (2 K 2^-24 + dropped) (alpha |g| * |w| summed),
    K = O KH KW the products per output; the float32 reference meets the same bound (it is not
    loose)."""
    got = conv_input_grad(g, w, size, stride, padding, alpha)
    size, stride, padding = (list(v) if isinstance(v, tuple) else [v, v] for v in (size, stride, padding))
    truth = reference.conv_input_grad(g.double(), w.double(), size, stride, padding, alpha)
    scale = reference.conv_input_grad(g.double().abs(), w.double().abs(), size, stride, padding, abs(alpha))
    K = w.shape[0] * w.shape[2] * w.shape[3]
    bound = (2 * K * 2.0**-24 + dropped) * scale
    assert got.dtype == torch.float32 and got.shape == truth.shape
    for name, value in (("op", got), ("float32 reference", reference.conv_input_grad(g, w, size, stride, padding, alpha))):
        err = (value.double() - truth).abs()
        bad = int((err > bound).sum())
        assert bad == 0, f"{name}: {bad} of {err.numel()} beyond the bound, worst {float((err - bound).max()):.3g}"
    return got


@pytest.fixture(params=["amx", "no_amx"])
def path(request, monkeypatch):
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1" if request.param == "no_amx" else "0")
    return request.param


@needs_kernel
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("layer", SEW_LAYERS, ids=lambda t: "C{}-O{}-k{}s{}p{}".format(*t))
def test_sew_resnet18_layers(layer, weights, path):
    C, O, k, s, p = layer
    gen = torch.Generator().manual_seed(C + O + k + s)
    for N, H, W in [(1, 7, 7), (2, 9, 8), (1, 14, 17)]:
        OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        _check(_grad(N, O, OH, OW, gen), WEIGHTS[weights](O, C, k, k, gen), (H, W), s, p, dropped=DROPPED[weights])


@needs_kernel
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("C,O", [(3, 5), (20, 48), (48, 20), (33, 64), (1, 1)])
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0)])
def test_odd_channel_counts(C, O, k, s, p, weights, path):
    gen = torch.Generator().manual_seed(C * O + k)
    for N, H, W in [(5, 11, 13), (3, 16, 15)]:
        OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        _check(_grad(N, O, OH, OW, gen, spread=True), WEIGHTS[weights](O, C, k, k, gen), (H, W), s, p, alpha=-2.5,
               dropped=DROPPED[weights])


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 40), O=st.integers(1, 40), H=st.integers(1, 13), W=st.integers(1, 13),
       KH=st.integers(1, 5), KW=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 3), pw=st.integers(0, 3), seed=st.integers(0, 2**16), weights=st.sampled_from(list(WEIGHTS)))
def test_any_kernel_stride_padding(N, C, O, H, W, KH, KW, sh, sw, ph, pw, seed, weights):
    """Rectangular kernels, strides and paddings, including kernels larger than the input,
    paddings of the kernel's size or more and strides larger than the kernel (input pixels that
    no tap reads: gradient 0)."""
    OH, OW = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    if OH < 1 or OW < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    _check(_grad(N, O, OH, OW, gen, spread=seed % 2 == 0), WEIGHTS[weights](O, C, KH, KW, gen), (H, W), (sh, sw),
           (ph, pw), dropped=DROPPED[weights])


def test_split_is_exact():
    """g = g1 + g2 + g3 exactly, each part exact in bfloat16, over float32's range down to 2^-102
    (every part normal or 0 there), huge and tiny values, zeros and random bits."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (100_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    g = bits.view(torch.float32)
    g = g[torch.isfinite(g) & (g.abs() >= 2.0**-102)]
    edges = torch.tensor([0.0, -0.0, 2.0**-102, -(2.0**-102) * 1.9999999, 3.4028235e38, -3.4028235e38, 1.0, 1 + 2**-23,
                          -(1 + 2**-23), 0.1, 65504.0])
    g = torch.cat([g, edges, torch.randn(1000, generator=gen)])
    parts = split_bf16(g)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    total = sum(p.double() for p in parts)
    assert torch.equal(total, g.double())
    assert all(bool((p.float().abs()[p != 0] >= 2.0**-126).all()) for p in parts)  # normal: AMX keeps them


@needs_kernel
@needs_amx
def test_amx_path_sums_the_three_parts_exactly(monkeypatch):
    """A 1x1 identity convolution returns g itself (g1 + g2 + g3 summed exactly in float32) down
    to 2^-102, and within 2^-124 below it (parts under 2^-126 are read as 0 by AMX, sums under
    it flushed), where ATen's float32 keeps denormals: this also shows the AMX path ran."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "0")
    gen = torch.Generator().manual_seed(1)
    C = 40
    eye = torch.eye(C).view(C, C, 1, 1)
    shape = (2, C, 9, 11)
    g = (1 + torch.rand(shape, generator=gen)) * torch.exp2(torch.randint(-100, 100, shape, generator=gen).float())
    g = torch.where(torch.rand(shape, generator=gen) < 0.5, -g, g)
    assert torch.equal(conv_input_grad(g, eye, (9, 11), 1, 0), g)
    tiny = torch.randn(2, C, 9, 11, generator=gen) * 2.0**-118
    got = conv_input_grad(tiny, eye, (9, 11), 1, 0)
    assert float((got - tiny).abs().max()) <= 2.0**-124
    assert not torch.equal(got, tiny)  # some bits below 2^-126 lost: the AMX path, not ATen's


@needs_kernel
@needs_amx
def test_float_weights_keep_the_pairs_i_plus_j_at_most_4(monkeypatch):
    """A 1x1 convolution from one channel (K = 1) is the single product g * w: a weight not exact
    in bfloat16 gives the float32 sum of the kept pairs of parts g_i w_j (i + j <= 4, split_bf16's
    parts of both) within its 5 roundings; a weight with one inexact entry takes that path too
    (decided per call). The dropped pairs are what the bound's 2^-21 term covers: g = w =
    1 + 2^-7 - 2^-23 (g2 w3 + g3 w2 near 2^-21) lands beyond float32's 2 K 2^-24, within it
    plus 2^-21."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "0")
    gen = torch.Generator().manual_seed(5)
    C = 37
    g = torch.randn(2, 1, 9, 11, generator=gen) * torch.exp2(torch.randint(-40, 40, (2, 1, 9, 11), generator=gen))
    w = _floats(1, C, 1, 1, gen)
    for weight in (w, torch.where(torch.arange(C).view(1, C, 1, 1) == 3, w, w.to(torch.bfloat16).float())):
        gp, wp = split_bf16(g), split_bf16(weight)
        kept = sum(gp[i].double() * wp[j].double() for i in range(3) for j in range(3) if i + j <= 2)
        got = conv_input_grad(g, weight, (9, 11), 1, 0)
        assert bool(((got.double() - kept).abs() <= 5 * 2.0**-24 * (g.double() * weight.double()).abs()).all())
    x = 1 + 2**-7 - 2**-23
    err = abs(float(conv_input_grad(torch.full((1, 1, 1, 1), x), torch.full((1, 1, 1, 1), x), (1, 1), 1, 0)) - x * x)
    assert 2 * 2.0**-24 * x * x < err <= (2 * 2.0**-24 + DROPPED["float"]) * x * x


@needs_kernel
def test_aten_path_is_the_references(monkeypatch):
    """Without AMX any weight (levels and float) runs the float32 reference bit for bit (ATen's
    own call), and conv2d_integer_input is F.conv2d bit for bit: the lock-step comparison with
    SpikingJelly (tests/test_models.py) runs on this path."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1")
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 24, 8, 8, generator=gen)
    for w, size, s in [(_floats(24, 16, 3, 3, gen), (8, 8), 1), (_levels(24, 16, 3, 3, gen), (15, 16), 2)]:
        got = conv_input_grad(g, w, size, s, 1, 0.7)
        assert torch.equal(got, reference.conv_input_grad(g, w, list(size), [s, s], [1, 1], 0.7))
    x, w = torch.randint(0, 2, (3, 24, 8, 8), generator=gen).float(), _floats(16, 24, 3, 3, gen)
    assert torch.equal(conv2d_integer_input(x, w, 1), F.conv2d(x, w, padding=1))  # the forward: ATen's own call


@needs_kernel
@needs_amx
def test_thread_count_does_not_change_the_result(monkeypatch):
    """Each output's sum runs in one fixed K order whatever work item holds it: the result is
    bitwise the same on 1, 2 and 3 threads."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "0")
    gen = torch.Generator().manual_seed(4)
    for (k, s, p), weights in [((3, 1, 1), _levels), ((3, 2, 1), _levels), ((3, 1, 1), _floats)]:
        g = _grad(3, 40, 9 // s, 9 // s, gen)
        w = weights(40, 24, k, k, gen)
        size = (9 // s * s, 9 // s * s)
        threads = torch.get_num_threads()
        try:
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(conv_input_grad(g, w, size, s, p))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(results[0], r) for r in results[1:])


@needs_kernel
def test_non_contiguous_inputs(path):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 10, 9, 32, generator=gen).transpose(2, 3)  # [2, 10, 32, 9] strided
    w = _levels(10, 7, 3, 3, gen).transpose(2, 3)
    _check(g, w, (32, 9), 1, 1)


@needs_kernel
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_weight_sign_reads_the_levels_of_a_cbp_weight(levels, path):
    """``weight_sign=True`` on a CBP weight Q(W) = s * q (s not exact in bfloat16; ternary with
    +0 and -0 entries; odd channel counts, 1 to 25 taps) with alpha = s is the op on q itself,
    bit for bit, within the bound of the float64 truth s * conv_transpose2d(g, q); a NaN weight
    counts as 0 (torch.sign's value: the layer passed torch.sign(Q(W)) before)."""
    gen = torch.Generator().manual_seed(6)
    s = 0.0371
    for C, O, k, st, p in [(64, 128, 3, 2, 1), (33, 20, 1, 1, 0), (24, 40, 3, 1, 1), (17, 5, 3, 1, 1), (7, 3, 4, 1, 2),
                           (40, 33, 5, 2, 2)]:
        q = _levels(O, C, k, k, gen)
        if levels == "binary":
            q = torch.where(q == 0, 1.0, q)
        wq = q * s
        if levels == "ternary":
            wq[0, : C // 2] = -0.0  # Q(W)'s zeros may carry a sign
            q[0, : C // 2] = 0.0
        H = 9
        OH = (H + 2 * p - k) // st + 1
        g = _grad(2, O, OH, OH, gen, spread=True)
        got = conv_input_grad(g, wq, (H, H), st, p, s, weight_sign=True)
        assert torch.equal(got, conv_input_grad(g, q, (H, H), st, p, s))
        assert torch.equal(got, _check(g, q, (H, H), st, p, alpha=s))
    wq[0, 0, 0, 0], q[0, 0, 0, 0] = float("nan"), 0.0
    assert torch.equal(conv_input_grad(g, wq, (H, H), st, p, s, weight_sign=True), conv_input_grad(g, q, (H, H), st, p, s))


@pytest.mark.parametrize("change,message", [
    (dict(grad_y=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), "grad_y must have dtype"),
    (dict(weight=torch.zeros(3, 2, 3, 3)), "one O"),
    (dict(input_size=(9, 9, 1)), "input_size"),
    (dict(input_size=(12, 9)), "do not follow"),
    (dict(stride=0), "stride"),
    (dict(padding=(-1, 0)), "padding"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(weight_sign=1), "weight_sign"),
])
def test_bad_arguments_are_named(change, message):
    args = dict(grad_y=torch.zeros(2, 4, 5, 5), weight=torch.zeros(4, 2, 3, 3), input_size=(9, 9), stride=2, padding=1,
                alpha=1.0)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=message):
        conv_input_grad(**args)


def _check_conv2d(x, w, padding, dropped):
    """conv2d_integer_input against float64 F.conv2d within (2 K 2^-24 + dropped) (|x| * |w|
    summed), K = C KH KW; F.conv2d in float32 meets the same bound."""
    got = conv2d_integer_input(x, w, padding)
    truth = F.conv2d(x.double(), w.double(), padding=padding)
    bound = (2 * w[0].numel() * 2.0**-24 + dropped) * F.conv2d(x.double().abs(), w.double().abs(), padding=padding)
    assert got.dtype == torch.float32 and got.shape == truth.shape
    for name, value in (("op", got), ("F.conv2d float32", F.conv2d(x, w, padding=padding))):
        bad = int(((value.double() - truth).abs() > bound).sum())
        assert bad == 0, f"{name}: {bad} of {truth.numel()} beyond the bound"


@needs_kernel
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("C,O,k,p", [(64, 64, 3, 1), (128, 128, 3, 1), (20, 48, 3, 0), (48, 20, 3, 2), (3, 5, 1, 0),
                                     (33, 64, 5, 2), (1, 1, 3, 1)])
def test_conv2d_integer_input(C, O, k, p, weights, path):
    """Spikes {0, 1} and SEW sums {0, 1, 2} (parts 2 and 3 zero: skipped), and float inputs (all
    three parts) at odd sizes; levels and float weights."""
    gen = torch.Generator().manual_seed(C * O + k + p)
    w = WEIGHTS[weights](O, C, k, k, gen)
    for N, H, W, top in [(2, 7, 9, 1), (3, 11, 10, 2)]:
        _check_conv2d(torch.randint(0, top + 1, (N, C, H, W), generator=gen).float(), w, p, DROPPED[weights])
    _check_conv2d(_grad(2, C, 8, 9, gen, spread=True), w, p, DROPPED[weights])


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 40), O=st.integers(1, 40), H=st.integers(1, 12), W=st.integers(1, 12),
       KH=st.integers(1, 5), KW=st.integers(1, 5), ph=st.integers(0, 4), pw=st.integers(0, 4),
       seed=st.integers(0, 2**16), weights=st.sampled_from(list(WEIGHTS)))
def test_conv2d_integer_input_any_kernel_padding(N, C, O, H, W, KH, KW, ph, pw, seed, weights):
    """Rectangular kernels and every padding 0 .. K - 1 (the flipped kernel's K - 1 - p)."""
    ph, pw = min(ph, KH - 1), min(pw, KW - 1)
    if H + 2 * ph < KH or W + 2 * pw < KW:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (N, C, H, W), generator=gen).float()
    _check_conv2d(x, WEIGHTS[weights](O, C, KH, KW, gen), (ph, pw), DROPPED[weights])


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), "x must have dtype"),
    (dict(weight=torch.zeros(3, 2, 3, 3)), "one C"),
    (dict(padding=3), "padding"),
    (dict(padding=(1, -1)), "padding"),
    (dict(x=torch.zeros(2, 4, 1, 5), padding=0), "smaller than the kernel"),
])
def test_conv2d_integer_input_bad_arguments_are_named(change, message):
    args = dict(x=torch.zeros(2, 4, 5, 5), weight=torch.zeros(6, 4, 3, 3), padding=1)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=message):
        conv2d_integer_input(**args)
