"""The packed weight format, packed_conv2d / packed_linear / packed_conv2d_lif (every backend
bit for bit against the reference and F.conv2d) and PackedConv2d / PackedLinear
(bitpack / bitunpack: test_bitpack.py)."""
from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbp_kernels.nn import PackedConv2d, PackedLinear
from cbp_kernels.ops import bitpack, pack_spikes, pack_weight, packed_conv2d, packed_linear, unpack_weight
from cbp_kernels.ops.bitconv import PackedWeight, infer_levels

from conftest import device_backends, devices, gpu, kernel_backends


def backends_of(op: str, device: str = "cpu") -> list[str]:
    """Every backend of ``op`` that runs on ``device`` here, the reference included."""
    return ["reference"] + kernel_backends(device, op, "cbp_kernels.ops.bitconv")


# The CPU kernel's paths, each forced by environment variables (a path the CPU lacks falls
# back to the next: AMX-INT8 -> AVX-512 VPOPCNTDQ -> portable).
CPU_PATHS = {"auto": {}, "avx512": {"CBP_KERNELS_NO_AMX": "1"}, "portable": {"CBP_KERNELS_NO_AVX512": "1"}}


def _cpu_path(monkeypatch, path: str) -> None:
    for var in ("CBP_KERNELS_NO_AMX", "CBP_KERNELS_NO_AVX512"):
        monkeypatch.setenv(var, CPU_PATHS[path].get(var, "0"))


def _spikes(shape, p=0.4, device="cpu"):
    return (torch.rand(shape, device=device) < p).float()


def _levels(shape, levels, device="cpu"):
    if levels == "binary":
        return torch.randint(0, 2, shape, device=device).float() * 2 - 1
    return torch.randint(-1, 2, shape, device=device).float()


def _spec(x, q, scale, bias, stride, padding, dilation, groups):
    """The specification in float64: float32(conv(x, q)) * scale + bias, NHWC."""
    count = F.conv2d(x.double(), q.double(), None, stride, padding, dilation, groups).float()
    out = count * torch.tensor(scale, dtype=torch.float32, device=x.device)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------- weight format
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("shape", [(5, 33, 3, 3), (4, 1, 1, 1), (7, 65), (3, 257, 1, 2)])
def test_pack_weight_round_trip(levels, shape):
    scale = 0.0371
    w_q = _levels(shape, levels) * scale
    packed = pack_weight(w_q, levels, scale)
    assert packed.planes.dtype == torch.int32 and packed.planes.shape[0] == (1 if levels == "binary" else 2)
    assert packed.shape == shape and packed.levels == levels
    assert torch.equal(unpack_weight(packed), w_q)
    found = levels if (w_q == 0).any() or levels == "binary" else "binary"  # ternary without a zero
    assert infer_levels(w_q) == (found, pytest.approx(scale))


def test_pack_weight_refuses_off_level_weights():
    w = _levels((4, 8, 3, 3), "ternary") * 0.5
    with pytest.raises(ValueError, match="binary"):
        pack_weight(w, "binary", 0.5)  # zeros are not binary
    w_off = _levels((4, 8, 3, 3), "binary") * 0.5
    w_off[1, 2, 0, 1] = 0.4999
    with pytest.raises(ValueError, match=r"w_q\[1, 2, 0, 1\]"):
        pack_weight(w_off, "binary", 0.5)
    with pytest.raises(ValueError, match="w_q"):
        pack_weight(w_off.abs() * 2, "binary", 0.5)  # +-1 levels of scale 1, not 0.5
    with pytest.raises(ValueError, match="scale"):
        pack_weight(w.abs(), "ternary", -0.5)
    with pytest.raises(ValueError, match="levels"):
        pack_weight(w, "quaternary", 0.5)
    with pytest.raises(ValueError, match="not binary or ternary"):
        infer_levels(torch.tensor([0.5, -0.25, 0.5]))


# ------------------------------------------------------------------------ packed_conv2d
def _conv_cases(n_cases: int, seed: int):
    """A seeded sample of the grid: channels x kernel x stride x padding x dilation x groups x bias."""
    rng = random.Random(seed)
    grid = list(itertools.product([1, 31, 33, 65, 257], [1, 3, 7], [1, 2], [0, 1, 3], [1, 2], [1, 3], [False, True]))
    cases = []
    for C, k, stride, pad, dil, groups, bias in rng.sample(grid, n_cases):
        groups = groups if C % groups == 0 else 1
        smallest = max(1, dil * (k - 1) + 1 - 2 * pad)  # the output must not be empty
        H, W = rng.randint(smallest, smallest + 5), rng.randint(smallest, smallest + 5)  # mostly non-square
        O = groups * rng.choice([1, 5, 17, 40, 70])
        N = rng.choice([1, 2])
        cases.append((N, C, O, H, W, k, stride, pad, dil, groups, bias))
    return cases


def _run_case(case, levels, backends, seed=0):
    torch.manual_seed(seed)
    N, C, O, H, W, k, stride, pad, dil, groups, with_bias = case
    x = _spikes((N, C, H, W))
    q = _levels((O, C // groups, k, k), levels)
    scale = 0.0371
    bias = torch.randn(O) if with_bias else None
    packed = pack_weight(q * scale, levels, scale)
    xp = pack_spikes(x.permute(0, 2, 3, 1), groups)
    want = _spec(x, q, scale, bias, stride, pad, dil, groups)
    for b in backends:
        out = packed_conv2d(xp, packed, bias, stride, pad, dil, groups, backend=b)
        assert out.dtype == torch.float32 and out.shape == want.shape, f"{b}: {tuple(out.shape)} vs {tuple(want.shape)}"
        diff = (out != want).sum().item()
        assert diff == 0, f"{b} {levels} case {case}: {diff} of {out.numel()} outputs differ from the spec"


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("case", _conv_cases(36, seed=5), ids=str)
def test_conv_bit_exact_cpu_and_reference(levels, case, monkeypatch):
    backends = [b for b in backends_of("bitconv2d") if b != "triton"]  # triton: below, fewer cases
    _run_case(case, levels, backends)
    if "cpu" in backends:  # the other CPU paths too (this machine may have AMX / AVX-512 VPOPCNTDQ)
        for path in ["avx512", "portable"]:
            _cpu_path(monkeypatch, path)
            _run_case(case, levels, ["cpu"])


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", [(2, 257, 40, 30, 30, 3, 1, 1, 1, 1, True), (3, 64, 70, 21, 19, 3, 2, 1, 1, 1, False),
                                  (160, 65, 40, 1, 1, 1, 1, 0, 1, 1, True), (40, 33, 17, 3, 2, 3, 1, 1, 1, 1, False)],
                         ids=str)
def test_conv_cpu_paths_many_work_items(path, case, monkeypatch):
    """Layers large enough for the AMX path (>= 128 output pixels) on each CPU path: several
    work items with windows across images and K in several passes; many small images, whose
    blocks of 32 rows run on from one image into the next (1 x 1 images: packed_linear)."""
    _cpu_path(monkeypatch, path)
    _run_case(case, "binary", ["cpu"])


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("case", [(2, 33, 17, 6, 5, 3, 1, 1, 1, 1, True), (1, 66, 6, 7, 4, 3, 2, 2, 2, 3, False),
                                  (1, 257, 40, 3, 3, 1, 1, 0, 1, 1, True)], ids=str)
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="triton runs on CPU tensors only under TRITON_INTERPRET=1 (make test sets it)")
def test_conv_bit_exact_triton(levels, case):
    _run_case(case, levels, ["triton"])


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
def test_conv_bit_exact_cuda(levels, tensor_cores, monkeypatch):
    monkeypatch.setenv("CBP_KERNELS_NO_TENSOR_CORES", "0" if tensor_cores == "1" else "1")
    for case in _conv_cases(12, seed=11):
        N, C, O, H, W, k, stride, pad, dil, groups, with_bias = case
        torch.manual_seed(0)
        x = _spikes((N, C, H, W), device="cuda")
        q = _levels((O, C // groups, k, k), levels, device="cuda")
        bias = torch.randn(O, device="cuda") if with_bias else None
        packed = pack_weight(q * 0.0371, levels, 0.0371)
        xp = pack_spikes(x.permute(0, 2, 3, 1), groups)
        want = _spec(x, q, 0.0371, bias, stride, pad, dil, groups)
        for b in [b for b in backends_of("bitconv2d", "cuda") if b != "reference"]:
            out = packed_conv2d(xp, packed, bias, stride, pad, dil, groups, backend=b)
            assert torch.equal(out, want), f"{b} {levels} case {case}"


@pytest.mark.parametrize("backend", [b for b in backends_of("bitconv2d") if b != "triton"])
def test_conv_equals_float_conv_with_power_of_two_scale(backend):
    """With a power-of-two scale every partial sum of F.conv2d(x, s*q) is exact: bit for bit equal."""
    x = _spikes((2, 70, 9, 7))
    for levels in ["binary", "ternary"]:
        w_q = _levels((24, 70, 3, 3), levels) * 0.125
        out = packed_conv2d(pack_spikes(x.permute(0, 2, 3, 1)), pack_weight(w_q, levels, 0.125), None, 1, 1, backend=backend)
        assert torch.equal(out, F.conv2d(x, w_q, None, 1, 1).permute(0, 2, 3, 1))
        # a general scale: equal up to the rounding order of F.conv2d's float sums
        w_q = _levels((24, 70, 3, 3), levels) * 0.0371
        bias = torch.randn(24)
        out = packed_conv2d(pack_spikes(x.permute(0, 2, 3, 1)), pack_weight(w_q, levels, 0.0371), bias, 1, 1, backend=backend)
        torch.testing.assert_close(out, F.conv2d(x, w_q, bias, 1, 1).permute(0, 2, 3, 1), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device", devices())
def test_conv_strided_bias_every_backend(device):
    """A bias that is a strided view (every other value of a buffer) reaches every kernel as the
    [O] values it holds."""
    x = _spikes((2, 40, 5, 6), device=device)
    w_q = _levels((12, 40, 3, 3), "binary", device=device) * 0.25
    bias = torch.randn(24, device=device)[::2]
    want = _spec(x, w_q / 0.25, 0.25, bias, 1, 1, 1, 1)
    for b in backends_of("bitconv2d", device):
        out = packed_conv2d(pack_spikes(x.permute(0, 2, 3, 1)), pack_weight(w_q, "binary", 0.25), bias, 1, 1, backend=b)
        assert torch.equal(out, want), b


def test_conv_time_folded():
    T, N = 3, 2
    x = _spikes((T, N, 40, 6, 6))
    q = _levels((8, 40, 3, 3), "binary")
    packed = pack_weight(q * 0.5, "binary", 0.5)
    xp = pack_spikes(x.permute(0, 1, 3, 4, 2)).flatten(0, 1)  # [T*N, H, W, Cw]
    out = packed_conv2d(xp, packed, None, 1, 1)
    want = F.conv2d(x.flatten(0, 1), q * 0.5, None, 1, 1).permute(0, 2, 3, 1)
    assert torch.equal(out, want)


def test_linear_bit_exact():
    for levels, C, bias in [("binary", 1, False), ("ternary", 65, True), ("binary", 257, True)]:
        x = _spikes((3, 5, C))
        q = _levels((11, C), levels)
        b = torch.randn(11) if bias else None
        packed = pack_weight(q * 0.0371, levels, 0.0371)
        want = F.linear(x.double(), q.double()).float() * torch.tensor(0.0371)
        want = want + b if bias else want
        for backend in [b_ for b_ in backends_of("bitconv2d")]:
            out = packed_linear(bitpack(x, -1), packed, b, backend=backend)
            assert out.shape == (3, 5, 11) and torch.equal(out, want), f"{backend} {levels} C={C}"


def test_conv_bad_input():
    packed = pack_weight(_levels((8, 40, 3, 3), "binary"), "binary", 1.0)
    xp = pack_spikes(_spikes((1, 5, 5, 40)))
    with pytest.raises(TypeError, match="int32"):
        packed_conv2d(_spikes((1, 5, 5, 2)), packed)  # float spikes, not packed
    with pytest.raises(ValueError, match="words per pixel"):
        packed_conv2d(pack_spikes(_spikes((1, 5, 5, 70))), packed)  # 3 words, the weight needs 2
    with pytest.raises(ValueError, match="past the 40 input channels"):
        packed_conv2d(xp | (1 << 20), packed)  # bit 40 + 12 of a 40-channel input
    with pytest.raises(TypeError, match="PackedWeight"):
        packed_conv2d(xp, packed.planes)
    with pytest.raises(ValueError, match="bias"):
        packed_conv2d(xp, packed, torch.zeros(7))
    with pytest.raises(ValueError, match="bias"):
        packed_conv2d(xp, packed, torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias is on meta"):
        packed_conv2d(xp, packed, torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="stride"):
        packed_conv2d(xp, packed, stride=0)
    with pytest.raises(ValueError, match="groups"):
        packed_conv2d(xp, packed, groups=3)
    with pytest.raises(ValueError, match="empty"):
        packed_conv2d(xp, pack_weight(_levels((8, 40, 7, 7), "binary"), "binary", 1.0))
    with pytest.raises(ValueError, match="linear weight"):
        packed_linear(xp, packed)
    with pytest.raises(RuntimeError, match="not available"):
        packed_conv2d(xp, packed, backend="cuda")


# ------------------------------------------------------------------------------- nn layers
def _float_conv(levels, scale=0.25, **kw):
    conv = nn.Conv2d(33, 12, 3, **kw)
    with torch.no_grad():
        conv.weight.copy_(_levels(conv.weight.shape, levels) * scale)
    return conv


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_packed_conv2d_module(levels):
    conv = _float_conv(levels, stride=2, padding=1, bias=True)
    m = PackedConv2d.from_float(conv)
    assert m.levels == levels and not any(isinstance(t, nn.Parameter) for t in m.parameters())
    x = _spikes((3, 2, 33, 9, 8))  # [T, N, C, H, W]
    out = m(x)
    want = conv(x.flatten(0, 1)).unflatten(0, (3, 2))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(m(x[0]), out[0])
    xp = pack_spikes(x.permute(0, 1, 3, 4, 2))
    assert torch.equal(m.forward_packed(xp), out.movedim(-3, -1))
    m2 = PackedConv2d(m.weight, m.bias, 2, 1)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), out)
    bits = 1 if levels == "binary" else 2
    assert m.weight.nbytes == 12 * 3 * 3 * 2 * 4 * bits + 4  # 33 channels -> 2 words per tap


def test_packed_from_quantized_layer_and_levels_argument():
    from cbp_kernels.nn import QuantConv2d, QuantLinear

    layer = QuantConv2d.from_float(nn.Conv2d(33, 12, 3, padding=1, bias=False), torch.tensor([-1.0, 0.0, 1.0]))
    m = PackedConv2d.from_float(layer)
    x = _spikes((2, 33, 6, 6))
    torch.testing.assert_close(m(x), layer(x), atol=1e-6, rtol=1e-6)
    lin = QuantLinear.from_float(nn.Linear(70, 9), torch.tensor([-1.0, 1.0]))
    ml = PackedLinear.from_float(lin)
    assert ml.levels == "binary"
    torch.testing.assert_close(ml(x.flatten(1)[:, :70]), lin(x.flatten(1)[:, :70]), atol=1e-6, rtol=1e-6)
    assert m.levels == "ternary"
    binary = _float_conv("binary", padding=1)
    assert PackedConv2d.from_float(binary, levels="ternary").levels == "ternary"
    with pytest.raises(ValueError, match="not binary"):
        PackedConv2d.from_float(_float_conv("ternary"), levels="binary")
    with pytest.raises(ValueError, match="not binary or ternary"):
        PackedConv2d.from_float(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m(x * 2)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        PackedConv2d.from_float(nn.Linear(3, 3))


def test_packed_linear_module():
    lin = nn.Linear(70, 10)
    with torch.no_grad():
        lin.weight.copy_(_levels(lin.weight.shape, "binary") * 0.125)
    m = PackedLinear.from_float(lin)
    x = _spikes((4, 3, 70))
    torch.testing.assert_close(m(x), lin(x), atol=1e-6, rtol=1e-6)
    assert torch.equal(m.forward_packed(bitpack(x, -1)), m(x))
    assert m.nbytes == 10 * 3 * 4 + 4 + 10 * 4
    assert isinstance(m.weight, PackedWeight)


# --------------------------------------------------------------------- fused epilogue
# (device, backend) of the fused-epilogue tests: every backend of each device here (the required
# ones always, see conftest.kernel_backends: triton on CPU tensors under TRITON_INTERPRET=1; cuda
# and triton on a GPU, cupy where it is installed).
@pytest.mark.parametrize("device,backend", device_backends("bitconv2d_lif", "cbp_kernels.ops.bitconv", reference=True))
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("neuron,v_reset", [("lif", 0.0), ("lif", None), ("if", -0.5)])
def test_fused_lif_matches_the_composition_of_the_ops(device, backend, levels, neuron, v_reset, monkeypatch):
    """conv -> affine -> multistep_neuron -> bitpack, bit for bit, on every fused backend."""
    from cbp_kernels.ops import multistep_neuron
    from cbp_kernels.ops.bitconv import packed_conv2d_lif

    # The Triton interpreter runs ~10 ms per tile step: small sizes keep it at a few seconds.
    interpreted = backend == "triton" and device == "cpu"
    T, N, C, H, W = (2, 1, 20, 5, 4) if interpreted else (3, 2, 40, 7, 6)
    # (kernel, stride, padding, dilation, groups, O): O = 70 / 40 leaves a partial output word.
    cases = [(3, 1, 1, 1, 1, 40 if interpreted else 70), (1, 2, 0, 1, 1, 70), (3, 2, 2, 1, 1, 70), (3, 1, 2, 2, 2, 64)]
    for k, stride, pad, dil, groups, O in cases:
        x = _spikes((T * N, C, H, W), device=device)
        q = _levels((O, C // groups, k, k), levels, device=device)
        fan_in = (C // groups) * k * k  # the count's spread grows as sqrt(fan_in): y's stays ~1
        mul = (torch.rand(O, device=device) * 0.4 + 0.05) * (360 / fan_in) ** 0.5
        add = torch.randn(O, device=device) * 0.3
        packed = pack_weight(q * 0.25, levels, 0.25)
        xp = pack_spikes(x.permute(0, 2, 3, 1), groups)
        y = F.conv2d(x.double(), q.double(), None, stride, pad, dil, groups).float().permute(0, 2, 3, 1) * mul + add
        spikes, v_last = multistep_neuron(y.unflatten(0, (T, N)), neuron=neuron, tau=2.0, v_reset=v_reset, backend="reference")
        want = (bitpack(spikes.flatten(0, 1), -1, backend="reference"), v_last)
        kw = dict(neuron=neuron, tau=2.0, v_reset=v_reset)
        for path in (CPU_PATHS if backend == "cpu" else ["auto"]):
            _cpu_path(monkeypatch, path)
            got = packed_conv2d_lif(xp, packed, T, mul, add, stride, pad, dil, groups, backend=backend, **kw)
            case = f"{backend} on {device} ({path}), k={k} stride={stride} dilation={dil} groups={groups}"
            assert torch.equal(got[0], want[0]), f"{case}: spikes differ"
            assert torch.equal(got[1], want[1]), f"{case}: v_last differs"
        assert 0.01 < float(spikes.mean()) < 0.99  # the case exercises both spike values


@pytest.mark.parametrize("device,backend", device_backends("bitconv2d_lif", "cbp_kernels.ops.bitconv", reference=True))
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_fused_lif_fires_on_the_threshold(device, backend, levels):
    """The tie rule S = (H - V_th >= 0): with the affine y = c / 4 (c the integer count; the
    channel scale carries the weight scale), H = V + c / 4 is exact, so counts c = 4 land on V_th = 1 (random affines never do); every
    backend fires there, as the reference."""
    from cbp_kernels.ops import multistep_neuron
    from cbp_kernels.ops.bitconv import packed_conv2d_lif

    T, N, C, H, W, O = 2, 1, 12, 4, 4, 40
    x = _spikes((T * N, C, H, W), p=0.5, device=device)
    q = _levels((O, C, 3, 3), levels, device=device)
    y = F.conv2d(x, q, None, 1, 1).permute(0, 2, 3, 1) * 0.25  # exact: dyadic counts
    assert bool((y == 1.0).any()), "the case must put some H exactly on the threshold"
    spikes, v_last = multistep_neuron(y.unflatten(0, (T, N)), neuron="if", v_reset=0.0, backend="reference")
    got = packed_conv2d_lif(pack_spikes(x.permute(0, 2, 3, 1)), pack_weight(q * 0.25, levels, 0.25), T,
                            torch.full((O,), 0.25, device=device), torch.zeros(O, device=device), 1, 1,
                            neuron="if", v_reset=0.0, backend=backend)
    assert torch.equal(got[0], bitpack(spikes.flatten(0, 1), -1, backend="reference")), f"{backend}: spikes differ"
    assert torch.equal(got[1], v_last), f"{backend}: v_last differs"


def test_fused_lif_bad_input():
    from cbp_kernels.ops.bitconv import packed_conv2d_lif

    packed = pack_weight(_levels((40, 32, 3, 3), "binary"), "binary", 1.0)
    xp = pack_spikes(_spikes((6, 5, 5, 64)), 2)
    with pytest.raises(ValueError, match="T must"):
        packed_conv2d_lif(xp, packed, 4, groups=2)
    with pytest.raises(ValueError, match="multiple of 32"):
        packed_conv2d_lif(xp, packed, 3, groups=2)  # 20 output channels per group
    xp1 = pack_spikes(_spikes((6, 5, 5, 32)))
    with pytest.raises(ValueError, match="channel_scale"):
        packed_conv2d_lif(xp1, packed, 3, torch.ones(3))
    with pytest.raises(ValueError, match="tau"):
        packed_conv2d_lif(xp1, packed, 3, tau=0.5)
    with pytest.raises(RuntimeError, match="not available for cpu tensors"):
        packed_conv2d_lif(xp1, packed, 3, backend="cupy")
