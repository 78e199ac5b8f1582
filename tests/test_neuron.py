"""multistep_neuron: every backend against the reference, the reference against SpikingJelly
2.0 and gradcheck, torch.compile, shape fuzzing and every bad input."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbp_kernels.ops import multistep_neuron
from cbp_kernels.ops.neuron import SURROGATES

from conftest import GRAD_TOL, assert_close, devices, kernel_backends, needs_spikingjelly

CONFIGS = [
    dict(neuron=n, v_reset=vr, detach_reset=dr, decay_input=di)
    for n, vr, dr, di in itertools.product(["if", "lif", "plif"], [0.0, None, -0.5], [False, True], [True, False])
    if not (n == "if" and not di)
]


def _run(x, v0, backend, cfg, tau=None, use_v_last=True):
    """Forward + backward with fixed random output weights (on the spikes, and on V[T-1] when
    ``use_v_last``); returns outputs and grads. Every tensor on x's device (the weights drawn
    on the CPU, the same on every device)."""
    x = x.detach().clone().requires_grad_()
    v0 = None if v0 is None else v0.detach().clone().requires_grad_()
    kw = dict(cfg)
    if kw.get("neuron") == "plif":
        tau = torch.tensor(tau or 2.5, device=x.device, requires_grad=True)
        kw["tau"] = tau
    spike, v_last = multistep_neuron(x, v0, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    ws = torch.randn(spike.shape, generator=g).to(spike.device, spike.dtype)
    wv = torch.randn(v_last.shape, generator=g).to(v_last.device, v_last.dtype)
    loss = (spike * ws).float().sum()
    (loss + (v_last * wv).sum() if use_v_last else loss).backward()
    grads = [x.grad, None if v0 is None else v0.grad, None if not isinstance(tau, torch.Tensor) else tau.grad]
    return spike, v_last, grads


def _inputs(shape, dtype, device="cpu", scale=1.5):
    x = (torch.randn(shape, device=device) * scale + 0.4).to(dtype)
    v0 = torch.rand(shape[1:], device=device) * 0.8
    return x, v0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("surrogate", list(SURROGATES))
def test_kernels_match_reference_float32(device, cfg, surrogate):
    backends = kernel_backends(device)
    x, v0 = _inputs((5, 3, 37), torch.float32, device)
    cfg = dict(cfg, surrogate=surrogate)
    ref = _run(x, v0, "reference", cfg)
    outs = {b: _run(x, v0, b, cfg) for b in backends}
    for b, out in outs.items():
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        assert_close(out[1], ref[1], 1e-6, 1e-6, f"{b} v_last")
        for name, ga, gr in zip(["x", "v_init", "tau"], out[2], ref[2]):
            if gr is not None:
                assert_close(ga, gr, 1e-5, 1e-4, f"{b} grad {name}")
    if "cuda" in outs and "triton" in outs:  # the same float32 ops (IEEE division, expf, no FMA)
        for name, ga, gc in zip(["x", "v_init"], outs["triton"][2], outs["cuda"][2]):
            assert torch.equal(ga, gc), f"triton's grad {name} differs from the cuda kernel's"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_default_state(device, cfg):
    """v_init=None (V[-1] = v_reset, 0 for the soft reset) and an unused V[T-1] (dL/dV[T-1] = 0)
    reach the backends as empty tensors: every backend, the reference included, against the
    reference given those states as explicit tensors."""
    x, _ = _inputs((4, 3, 37), torch.float32, device)
    explicit = torch.full(x.shape[1:], cfg["v_reset"] or 0.0, device=device)
    ref = _run(x, explicit, "reference", cfg, use_v_last=False)
    for b in ["reference"] + kernel_backends(device):
        out = _run(x, None, b, cfg, use_v_last=False)
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        assert_close(out[1], ref[1], 1e-6, 1e-6, f"{b} v_last")
        for name, ga, gr in zip(["x", "tau"], out[2][::2], ref[2][::2]):
            if gr is not None:
                assert_close(ga, gr, 1e-5, 1e-4, f"{b} grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_low_precision(device, dtype):
    backends = kernel_backends(device)
    x, v0 = _inputs((4, 2, 33), dtype, device)
    cfg = dict(neuron="plif", v_reset=0.0)
    ref = _run(x, v0, "reference", cfg)
    atol, rtol = GRAD_TOL[dtype]
    for b in backends:
        out = _run(x, v0, b, cfg)
        assert out[0].dtype == dtype
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        assert_close(out[1], ref[1], 1e-5, 1e-5, f"{b} v_last")
        for name, ga, gr in zip(["x", "v_init", "tau"], out[2], ref[2]):
            assert_close(ga, gr, atol, rtol * (10 if name == "tau" else 1), f"{b} grad {name}")


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_and_odd_shapes(device):
    backends = kernel_backends(device)
    base = torch.randn(3, 7, 11, 2, device=device) + 0.5
    x = base.transpose(1, 2)[..., 0]  # [3, 11, 7], non-contiguous
    assert not x.is_contiguous()
    ref = _run(x, None, "reference", dict(neuron="lif"))
    for b in backends:
        out = _run(x, None, b, dict(neuron="lif"))
        assert torch.equal(out[0], ref[0])
        assert_close(out[2][0], ref[2][0], 1e-5, 1e-4, f"{b} grad x")


@pytest.mark.parametrize("device", devices())
def test_kernels_many_column_blocks(device):
    """More columns than one work item of the C++ kernel (16384) or one Triton program (1024):
    the blocks' partial sums of PLIF's dL/dk and the last, partial block."""
    backends = kernel_backends(device)
    x, v0 = _inputs((3, 2 * 16384 + 5), torch.float32, device)
    cfg = dict(neuron="plif", v_reset=None)
    ref = _run(x, v0, "reference", cfg)
    for b in backends:
        out = _run(x, v0, b, cfg)
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        for name, ga, gr in zip(["x", "v_init", "tau"], out[2], ref[2]):
            assert_close(ga, gr, 1e-5, 1e-4, f"{b} grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T, n", [(64, 16384 + 200), (300, 2 * 128 + 3)])
def test_long_sequences(device, T, n):
    """Long T after short ones (the CPU kernel's per-thread buffer of T chunks of H grows), with
    full and partial column chunks and several OpenMP work items: PLIF from a given v_init."""
    x, v0 = _inputs((T, n), torch.float32, device, scale=0.8)
    cfg = dict(neuron="plif", v_reset=0.0)
    ref = _run(x, v0, "reference", cfg)
    for b in kernel_backends(device):
        out = _run(x, v0, b, cfg)
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        for name, ga, gr in zip(["x", "v_init", "tau"], out[2], ref[2]):
            assert_close(ga, gr, 1e-5, 1e-4 * (10 if name == "tau" else 1), f"{b} grad {name}")


def _c10_bfloat16_bits(values: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16(float)'s bits of float32 ``values`` (as int32 in [0, 0xFFFF]): round to
    nearest even on the bits, (u + 0x7FFF + ((u >> 16) & 1)) >> 16, and 0x7FC0 for every NaN."""
    u = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(values.isnan(), 0x7FC0, bits).to(torch.int32)


@pytest.mark.parametrize("isa", ["best", "avx512_without_bf16", "portable"])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_cpu_bfloat16_grad_rounds_like_c10(monkeypatch, isa, surrogate):
    """The CPU kernel computes in float32 whatever the dtype and rounds dL/dX to bfloat16 as
    c10 does, on the AVX512-BF16 path (cpu/bf16_rows.h) as on the portable one: bit for bit the
    float32 kernel's gradient on the same, widened, inputs, rounded by c10's formula. With
    values that need rounding, NaN (c10 writes 0x7FC0 for any sign and payload, which the
    AVX512-BF16 instruction keeps) and gradients that are float32 denormals (which it reads as
    zero), in whole groups of 32 columns and a tail."""
    switch = {"avx512_without_bf16": "CBP_KERNELS_NO_AVX512_BF16", "portable": "CBP_KERNELS_NO_AVX512"}
    if isa in switch:
        monkeypatch.setenv(switch[isa], "1")
    T, n = 5, 3 * 4096 + 37
    x, _ = _inputs((T, n), torch.bfloat16)
    grad = torch.randn(T, n).to(torch.bfloat16)
    grad[:, ::89] = 1e-39  # every step of these columns tiny: dL/dX a float32 denormal
    grad[:, 5::83] = -3e-40
    grad[1, ::97] = float("nan")  # and NaN from t = 1 down: 0x7FC0
    grad.view(torch.int16)[3, 7::101] = -63  # 0xFFC1: a NaN with its sign and a payload

    def grad_x(x, grad):
        x = x.clone().requires_grad_()
        spike, _ = multistep_neuron(x, surrogate=surrogate, backend="cpu")
        return torch.autograd.grad(spike, x, grad)[0]

    expected = grad_x(x.float(), grad.float())
    assert expected.isnan().any() and ((expected.abs() < torch.finfo(torch.float32).tiny) & (expected != 0)).any()
    got = grad_x(x, grad).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(got, _c10_bfloat16_bits(expected)), f"{int((got != _c10_bfloat16_bits(expected)).sum())} values"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_streamed_outputs_bitwise(dtype):
    """The CPU kernel writes S over 4 MiB (and then V[T-1]) and dL/dX over 16 MiB with
    64-byte-aligned rows by non-temporal stores (the last, partial chunk of a row by plain
    ones), and prefetches rows ahead: each
    column of such a call equals, bit for bit, the same column from a small call (plain
    stores), and the spikes are the reference's."""
    T, n = 64, 8 * 16384 + 160  # T * n * 2 bytes > 16 MiB, n * 2 bytes a multiple of 64, n % 128 = 32
    x, v0 = _inputs((T, n), dtype, scale=0.8)
    grad = torch.randn(T, n).to(dtype)
    cfg = dict(neuron="lif", v_reset=0.0, surrogate="sigmoid")

    def step(x, v0, grad, backend="cpu"):
        x, v0 = x.clone().requires_grad_(), v0.clone().requires_grad_()
        spike, v_last = multistep_neuron(x, v0, backend=backend, **cfg)
        return (spike, v_last, *torch.autograd.grad(spike, (x, v0), grad))

    big = step(x, v0, grad)
    for cols in (slice(0, 96), slice(n - 200, n)):  # full chunks, and a partial one after them
        small = step(x[:, cols], v0[cols], grad[:, cols])
        assert torch.equal(small[0], step(x[:, cols], v0[cols], grad[:, cols], "reference")[0])
        for name, a, b in zip(["spike", "v_last", "grad x", "grad v_init"], big, small):
            assert torch.equal(a[..., cols], b), f"{name} of columns {cols}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the Triton interpreter's exp: inf is right
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("surrogate", list(SURROGATES))
def test_surrogates_far_from_threshold(device, surrogate):
    """Every surrogate where H - V_th is large (the CPU Sigmoid's own exp clamps its argument at
    alpha |H - V_th| > 87) and on a dense grid through each kink: IF with T = 1, so dL/dX =
    sg'(H - V_th), within 1e-7 (sg' <= alpha / 4 = 1 for the Sigmoid)."""
    far = torch.tensor([-1e4, -300.0, -30.0, -22.0, 22.0, 30.0, 300.0, 1e4])
    h = torch.cat([far, torch.linspace(-8.0, 8.0, 4001)])  # and a dense grid through every kink
    x = (h + 1.0).reshape(1, -1).to(device)  # H = 0 + X, V_th = 1
    ref = _run(x, None, "reference", dict(neuron="if", surrogate=surrogate), use_v_last=False)
    for b in kernel_backends(device):
        out = _run(x, None, b, dict(neuron="if", surrogate=surrogate), use_v_last=False)
        assert torch.equal(out[0], ref[0]), f"{b}: spikes differ from the reference"
        assert_close(out[2][0], ref[2][0], 1e-7, 1e-5, f"{b} {surrogate} grad x")


@pytest.mark.parametrize("neuron", ["if", "lif", "plif"])
@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("decay_input", [True, False])
def test_reference_gradcheck_float64(monkeypatch, neuron, v_reset, decay_input):
    from cbp_kernels.ops.neuron import reference

    class Smooth:  # SpikeFn.apply(x, surrogate, alpha) -> differentiable sig(alpha x)
        @staticmethod
        def apply(x, surrogate, alpha):
            return torch.sigmoid(alpha * x)

    monkeypatch.setattr(reference, "SpikeFn", Smooth)
    x = (torch.randn(4, 5, dtype=torch.float64) + 0.5).requires_grad_()
    v0 = (torch.rand(5, dtype=torch.float64) * 0.3).requires_grad_()
    tau = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)

    def f(x, v0, tau):
        return multistep_neuron(x, v0, neuron=neuron, tau=tau, v_reset=v_reset, decay_input=decay_input,
                                surrogate="sigmoid", backend="reference")

    assert torch.autograd.gradcheck(f, (x, v0, tau))


def test_reference_surrogate_backward_matches_primitive_derivative():
    """The Heaviside spike's backward is exactly d/dx of the sigmoid primitive (what the
    gradcheck above replaced), so the two tests together check the real reference."""
    from cbp_kernels.ops.neuron.surrogate import SpikeFn

    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    SpikeFn.apply(x, SURROGATES["sigmoid"], 4.0).sum().backward()
    xs = x.detach().clone().requires_grad_()
    torch.sigmoid(4.0 * xs).sum().backward()
    assert_close(x.grad, xs.grad, 1e-12, 1e-12, "surrogate vs primitive derivative")


def _sj_node(cfg, surrogate_cls):
    from spikingjelly.activation_based import neuron as sjn
    from spikingjelly.activation_based import surrogate as sjs

    common = dict(v_threshold=1.0, v_reset=cfg["v_reset"], detach_reset=cfg["detach_reset"],
                  surrogate_function=getattr(sjs, surrogate_cls)(), step_mode="m")
    if cfg["neuron"] == "if":
        return sjn.IFNode(**common)
    if cfg["neuron"] == "lif":
        return sjn.LIFNode(tau=2.0, decay_input=cfg["decay_input"], **common)
    return sjn.ParametricLIFNode(init_tau=2.0, decay_input=cfg["decay_input"], **common)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("sj_surrogate,ours", [("ATan", "atan"), ("Sigmoid", "sigmoid")])
@needs_spikingjelly
def test_against_spikingjelly(cfg, sj_surrogate, ours):
    from cbp_kernels import nn as cnn

    sj = _sj_node(cfg, sj_surrogate)
    kw = dict(v_reset=cfg["v_reset"], detach_reset=cfg["detach_reset"], surrogate_function=ours, step_mode="m")
    if cfg["neuron"] == "if":
        mine = cnn.IF(**kw)
    elif cfg["neuron"] == "lif":
        mine = cnn.LIF(tau=2.0, decay_input=cfg["decay_input"], **kw)
    else:
        mine = cnn.PLIF(init_tau=2.0, decay_input=cfg["decay_input"], **kw)
    x = torch.randn(6, 4, 9) * 1.5 + 0.5
    outs = []
    for node in (sj, mine):
        xi = x.clone().requires_grad_()
        s = node(xi)
        (s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum().backward()
        params = [p.grad for p in node.parameters()]
        outs.append((s.detach(), xi.grad, params))
    assert torch.equal(outs[0][0], outs[1][0]), "spikes differ from SpikingJelly"
    assert_close(outs[1][1], outs[0][1], 1e-5, 1e-4, "grad x vs SpikingJelly")
    for gm, gs in zip(outs[1][2], outs[0][2]):
        assert_close(gm, gs, 1e-5, 1e-4, "grad w (PLIF) vs SpikingJelly")


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    neuron=st.sampled_from(["if", "lif", "plif"]),
    v_reset=st.sampled_from([0.0, None]),
)
def test_shape_fuzz(shape, neuron, v_reset):
    backends = kernel_backends("cpu")
    x = torch.randn(shape) + 0.5
    cfg = dict(neuron=neuron, v_reset=v_reset)
    ref = _run(x, None, "reference", cfg)
    assert ref[0].shape == x.shape and ref[1].shape == x.shape[1:]
    for b in backends:
        out = _run(x, None, b, cfg)
        assert torch.equal(out[0], ref[0])
        assert_close(out[2][0], ref[2][0], 1e-5, 1e-4, f"{b} grad x")


BAD = [
    (dict(x=torch.randn(3)), None),  # rank 1 is allowed: [T]
    (dict(x=torch.randn(0, 4)), "T >= 1"),
    (dict(x=torch.randn(3, 0)), "empty"),
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), "dtype"),
    (dict(x=torch.randn(3, 4), v_init=torch.zeros(5)), "v_init must have shape"),
    (dict(x=torch.randn(3, 4), tau=1.0), "tau must be > 1"),
    (dict(x=torch.randn(3, 4), tau=float("nan")), "tau must be finite"),
    (dict(x=torch.randn(3, 4), neuron="plif", tau=torch.tensor(0.5)), "tau must be > 1"),
    (dict(x=torch.randn(3, 4), v_threshold=0.0, v_reset=0.0), "must be greater than v_reset"),
    (dict(x=torch.randn(3, 4), v_threshold=float("nan")), "v_threshold must be finite"),
    (dict(x=torch.randn(3, 4), surrogate="relu"), "surrogate must be one of"),
    (dict(x=torch.randn(3, 4), neuron="izhikevich"), "neuron must be one of"),
    (dict(x=torch.randn(3, 4), alpha=-1.0), "alpha must be > 0"),
    (dict(x=torch.randn(3, 4), backend="fortran"), "backend must be"),
    (dict(x=torch.randn(3, 4, dtype=torch.float64), backend="cpu"), "float64"),
    (dict(x=torch.randn(3, 4), backend="cuda"), "not available"),
    (dict(x=[1.0, 2.0]), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("case,match", BAD)
def test_bad_input(case, match):
    x = case.pop("x")
    if match is None:
        s, v = multistep_neuron(x, **case)
        assert s.shape == x.shape and v.shape == ()
        return
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        multistep_neuron(x, **case)


def test_checked_settings_are_cached_by_type_and_value():
    """prepare caches its scalar checks (ops/neuron/op.py ``_cached``): a setting that passed once
    does not let an equal one of another type through (True == 1), an unhashable one gets the
    checks' own error, and the cached decay, first made under inference mode, can be saved by a
    graph later."""
    x = torch.randn(3, 4)
    multistep_neuron(x, v_threshold=1, v_reset=0)  # int settings: valid, now cached
    with pytest.raises(TypeError, match="v_threshold must be a real number"):
        multistep_neuron(x, v_threshold=True, v_reset=0)
    with pytest.raises(TypeError, match="v_threshold must be a real number"):
        multistep_neuron(x, v_threshold=[1.0])
    with torch.inference_mode():
        multistep_neuron(x, tau=3.25)
    xg = x.clone().requires_grad_()
    spike, _ = multistep_neuron(xg, tau=3.25, surrogate="sigmoid")
    spike.sum().backward()
    ref = x.clone().requires_grad_()
    ref_spike, _ = multistep_neuron(ref, tau=3.25, surrogate="sigmoid", backend="reference")
    ref_spike.sum().backward()
    assert torch.equal(spike, ref_spike)
    assert_close(xg.grad, ref.grad, 1e-6, 1e-5, "grad x after the cached decay")


def test_mixed_devices_rejected():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="v_init is on meta"):
        multistep_neuron(torch.randn(3, 4), meta)


def test_cuda_source_for_cupy_is_self_contained():
    """The text the cupy backend hands to NVRTC: found, with the project's headers inlined."""
    from cbp_kernels.ops._cuda_source import csrc_root, cuda_source

    src = cuda_source("neuron")
    assert (csrc_root() / "cuda" / "neuron.cuh").is_file()
    assert '#include "' not in src, "a local include was left for NVRTC to resolve"
    assert "CBP_HD float neuron_charge(" in src and src.count("struct NeuronParams {") == 1
    with pytest.raises(FileNotFoundError, match="no_such_op"):
        cuda_source("no_such_op")


def test_cpu_portable_path_matches_reference():
    """The C++ kernels' portable (non-AVX-512) build, forced by CBP_KERNELS_NO_AVX512=1 in a
    fresh process (the choice is made once per process), on every surrogate and PLIF."""
    import os
    import subprocess
    import sys

    script = """
import torch
from cbp_kernels.ops import multistep_neuron
torch.manual_seed(0)
x = torch.randn(6, 3, 41) * 1.5 + 0.4
for surrogate in ("atan", "sigmoid", "rectangle", "triangle", "piecewise_quadratic"):
    for v_reset in (0.0, None):
        outs = []
        for backend in ("reference", "cpu"):
            xi = x.clone().requires_grad_()
            tau = torch.tensor(2.5, requires_grad=True)
            s, v = multistep_neuron(xi, neuron="plif", tau=tau, v_reset=v_reset, surrogate=surrogate, backend=backend)
            ((s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum() + v.sum()).backward()
            outs.append((s, v, xi.grad, tau.grad))
        (s0, v0, gx0, gk0), (s1, v1, gx1, gk1) = outs
        assert torch.equal(s0, s1), (surrogate, v_reset, "spikes")
        torch.testing.assert_close(v1, v0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gk1, gk0, atol=1e-4, rtol=1e-4)
"""
    env = dict(os.environ, CBP_KERNELS_NO_AVX512="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
