"""sigmoid_quantize (the seed-001 peer's differentiable quantizer): kernels vs reference,
gradcheck, the hard limit as the temperature grows, bad input."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.ops.sigmoid_quant import sigmoid_hard_quantize, sigmoid_quantize

from conftest import GRAD_TOL, assert_close, devices, kernel_backends

OP = dict(op="sigmoid_quant_forward", package="cbp_kernels.ops.sigmoid_quant")
LEVELS = {"binary": [-1.0, 1.0], "ternary": [-1.0, 0.0, 1.0], "2bit": [-3.0, -1.0, 1.0, 3.0]}


def _run(w, alpha, beta, levels, temperature, backend):
    w = w.detach().clone().requires_grad_()
    a = alpha.detach().clone().requires_grad_()
    b = beta.detach().clone().requires_grad_()
    y = sigmoid_quantize(w, a, b, levels, temperature, backend=backend)
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y).to(y.dtype)
    (y * weight).float().sum().backward()
    return y, w.grad, a.grad, b.grad


def _weights(n, device, dtype=torch.float32):
    w = torch.randn(n, device=device) * 0.05
    beta = torch.tensor(1.25 / float(w.abs().max()), device=device)
    return w.to(dtype), 1 / beta, beta


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("levels", list(LEVELS))
@pytest.mark.parametrize("temperature", [1.0, 7.0, 60.0])
@pytest.mark.parametrize("n", [1, 31, 1000, 4099])
def test_kernels_match_reference(device, levels, temperature, n):
    backends = kernel_backends(device, **OP)
    w, alpha, beta = _weights(n, device)
    ref = _run(w, alpha, beta, LEVELS[levels], temperature, "reference")
    for b in backends:
        out = _run(w, alpha, beta, LEVELS[levels], temperature, b)
        assert_close(out[0], ref[0], 1e-6, 1e-5, f"{b} y")
        assert_close(out[1], ref[1], 1e-5, 1e-4, f"{b} grad w")
        assert_close(out[2], ref[2], 1e-4, 1e-4, f"{b} grad alpha")
        assert_close(out[3], ref[3], 1e-5, 1e-4, f"{b} grad beta")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_low_precision_and_non_contiguous(device, dtype):
    backends = kernel_backends(device, **OP)
    w, alpha, beta = _weights(64 * 33, device)
    w = w.view(64, 33).t().to(dtype)  # non-contiguous [33, 64]
    assert not w.is_contiguous()
    ref = _run(w, alpha, beta, LEVELS["ternary"], 5.0, "reference")
    atol, rtol = GRAD_TOL[dtype]
    for b in backends:
        out = _run(w, alpha, beta, LEVELS["ternary"], 5.0, b)
        assert out[0].dtype == dtype and out[0].shape == w.shape
        for name, got, want in zip(["y", "grad w"], out[:2], ref[:2]):
            assert_close(got, want, atol * max(1.0, float(want.detach().abs().max())), rtol, f"{b} {name}")


@pytest.mark.parametrize("device", devices())
def test_kernels_read_strided_biases_as_their_values(device):
    """biases= given as a strided view (every other value of a buffer) reach every kernel as
    the [n] values they hold."""
    w, alpha, beta = _weights(300, device)
    biases = torch.tensor([-0.3, 9.0, 0.4, 9.0], device=device)[::2]
    want = sigmoid_quantize(w, alpha, beta, [-1, 0, 1], 8.0, biases=biases.contiguous(), backend="reference")
    for b in kernel_backends(device, **OP):
        got = sigmoid_quantize(w, alpha, beta, [-1, 0, 1], 8.0, biases=biases, backend=b)
        assert_close(got, want, 1e-6, 1e-5, b)


def test_reference_gradcheck_float64():
    w = (torch.randn(20, dtype=torch.float64) * 0.05).requires_grad_()
    alpha = torch.tensor(0.03, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(25.0, dtype=torch.float64, requires_grad=True)
    f = lambda w, a, b: sigmoid_quantize(w, a, b, [-1, 0, 1], 0.8, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, alpha, beta))


@pytest.mark.parametrize("levels", list(LEVELS))
def test_large_temperature_limit_is_the_hard_quantizer(levels):
    w, alpha, beta = _weights(2000, "cpu")
    hard = sigmoid_hard_quantize(w, alpha, beta, LEVELS[levels])
    q = torch.tensor(LEVELS[levels])
    # the hard quantizer's outputs are exactly alpha * levels
    assert torch.isin(torch.round(hard / alpha, decimals=4), q).all()
    # away from the midpoints (|T (beta w - b_i)| > 10 for every i) the soft one equals it
    gaps, mids = q[1:] - q[:-1], (q[1:] + q[:-1]) / 2
    errors = []
    for temperature in (10.0, 100.0, 1000.0):
        soft = sigmoid_quantize(w, alpha, beta, LEVELS[levels], temperature, backend="reference")
        errors.append(float((soft - hard).abs().max() / alpha))
        far = ((temperature * (beta * w[:, None] - mids)).abs() > 10).all(1)
        assert_close(soft[far], hard[far], 1e-3 * float(alpha) * float(gaps.max()), 0, f"T={temperature}")
    assert errors[-1] < errors[0], f"no convergence to the hard steps: {errors}"


BAD = [
    (dict(levels=[-1.0, 0.5]), "symmetric"),
    (dict(levels=[1.0, -1.0]), "sorted"),
    (dict(levels=[1.0]), "2 to 17"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(alpha=torch.ones(2)), "alpha must be a one-element"),
    (dict(w=torch.zeros(0)), "empty"),
    (dict(w=torch.zeros(3, dtype=torch.int64)), "dtype"),
    (dict(w=torch.zeros(3, dtype=torch.float64), backend="cpu"), "float64"),
]


@pytest.mark.parametrize("case,match", BAD)
def test_bad_input(case, match):
    args = dict(w=torch.randn(5), alpha=torch.tensor(1.0), beta=torch.tensor(1.0), levels=[-1, 1], temperature=2.0)
    args.update(case)
    backend = args.pop("backend", "auto")
    with pytest.raises((ValueError, TypeError), match=match):
        sigmoid_quantize(args["w"], args["alpha"], args["beta"], args["levels"], args["temperature"], backend=backend)


# ---- the layers and the quantizer ---------------------------------------------------------

def _toy(seed=0):
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 8)
    y = x[:, :4].argmax(1)
    return net, x, y, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def test_layers_train_soft_and_eval_hard():
    from cbp_kernels.nn.sigmoid_quant import SigmoidQuantConv2d

    conv = torch.nn.Conv2d(3, 4, 3)
    q = SigmoidQuantConv2d.from_float(conv, [-1.0, 0.0, 1.0])
    assert q.weight is conv.weight and float((q.alpha * q.beta).detach()) == pytest.approx(1.0)
    q.temperature = 4.0
    q(torch.randn(2, 3, 6, 6)).sum().backward()
    assert q.alpha.grad is not None and q.beta.grad is not None and conv.weight.grad is not None
    q.eval()
    units = torch.unique(q.quantized_weight() / q.alpha)
    assert set(units.tolist()) <= {-1.0, 0.0, 1.0} and len(units) >= 2


def test_sigmoid_quantizer_end_to_end():
    from torch.nn import functional as F

    from cbp_kernels.nn import QuantLinear
    from cbp_kernels.quant import SigmoidConfig, SigmoidQuantizer

    net, x, y, loader = _toy()
    q = SigmoidQuantizer(net, "ternary", config=SigmoidConfig(lr=1e-2, temperature0=5.0, temperature_max=20.0))
    assert list(q.layers) == ["2"], "the first and last layers stay in float by default"
    history = q.fit(loader, F.cross_entropy, epochs=5, progress=False)
    assert [r["temperature"] for r in history] == [5.0, 10.0, 15.0, 20.0, 20.0]
    assert history[-1]["loss"] < history[0]["loss"]
    model, export = q.finalize()
    layer = model[2]
    assert isinstance(layer, QuantLinear)
    assert set(torch.unique(layer.weight / layer.weight_scale).tolist()) <= {-1.0, 0.0, 1.0}
    codes = export["2"]["codes"].long()
    levels = torch.tensor(export["2"]["levels"])
    assert torch.equal(levels[codes] * export["2"]["scale"], layer.weight.detach())
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5, f"the quantized toy model is at chance ({accuracy:.2f})"


def test_sigmoid_quantizer_state_round_trip(tmp_path):
    from torch.nn import functional as F

    from cbp_kernels.quant import SigmoidConfig, SigmoidQuantizer

    config = SigmoidConfig(lr=1e-2)
    net, _, _, loader = _toy()
    q = SigmoidQuantizer(net, "binary", config=config)
    q.fit(loader, F.cross_entropy, epochs=2, progress=False, checkpoint_dir=tmp_path)
    net2, _, _, _ = _toy(seed=1)
    q2 = SigmoidQuantizer(net2, "binary", config=config)
    q2.load_checkpoint(tmp_path / "last.pt")
    assert q2.epoch == 2 and q2.temperature == config.temperature(2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_sigmoid_quantizer_bad_configs():
    from cbp_kernels.quant import SigmoidConfig, SigmoidQuantizer

    with pytest.raises(ValueError, match="symmetric"):
        SigmoidQuantizer(_toy()[0], [-2.0, -1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="temperature_max"):
        SigmoidConfig(temperature0=10.0, temperature_max=5.0)
    with pytest.raises(ValueError, match="lr"):
        SigmoidConfig(lr=0.0)
    with pytest.raises(TypeError, match="SigmoidConfig"):
        SigmoidQuantizer(_toy()[0], "binary", config=object())


def test_cupy_source_has_every_kernel_the_backend_launches():
    """The cupy backend cannot run without a GPU; its source (inlined headers) and the kernel
    names it launches are checked here."""
    from cbp_kernels.ops._cuda_source import cuda_source

    src = cuda_source("sigmoid_quant")
    assert "#include \"" not in src and "sigmoid_sum(" in src
    for direction in ("forward", "backward"):
        for suffix in ("f32", "f16", "bf16"):
            assert f"CBP_SIGMOID_QUANT_KERNELS({suffix}," in src
            assert f"sigmoid_quant_{direction}_##suffix" in src


def test_kmeans_biases_follow_the_weight_clusters():
    from cbp_kernels.quant.sigmoid import kmeans_biases

    g = torch.Generator().manual_seed(0)
    # two clusters at -0.2 and +0.6 (not symmetric): the k-means midpoint is near 0.2, not 0
    x = torch.cat([torch.randn(500, generator=g) * 0.02 - 0.2, torch.randn(500, generator=g) * 0.02 + 0.6])
    b = kmeans_biases(x, torch.tensor([-1.0, 1.0]))
    assert b.shape == (1,) and abs(float(b) - 0.2) < 0.02
    b3 = kmeans_biases(torch.cat([x, torch.randn(500, generator=g) * 0.02 + 1.5]), torch.tensor([-1.0, 0.0, 1.0]))
    assert b3.shape == (2,) and b3[0] < b3[1]
    with pytest.raises(ValueError, match="distinct"):
        kmeans_biases(torch.zeros(10), torch.tensor([-1.0, 1.0]))


def test_biases_replace_the_midpoints_in_the_op_and_are_checked():
    w, alpha, beta = _weights(100, "cpu")
    shifted = torch.tensor([-0.3, 0.4])
    y = sigmoid_quantize(w, alpha, beta, [-1, 0, 1], 1000.0, biases=shifted, backend="reference")
    hard = sigmoid_hard_quantize(w, alpha, beta, [-1, 0, 1], shifted)
    expected = alpha * ((beta * w > 0.4).float() - (beta * w <= -0.3).float())
    far = ((beta * w - 0.4).abs() > 0.05) & ((beta * w + 0.3).abs() > 0.05)
    assert torch.equal(hard, expected) and torch.allclose(y[far], hard[far], atol=1e-4)
    for bad, match in ((torch.tensor([0.4, -0.3]), "increasing"), (torch.tensor([0.1]), "one per gap")):
        with pytest.raises(ValueError, match=match):
            sigmoid_quantize(w, alpha, beta, [-1, 0, 1], 5.0, biases=bad)


def test_sigmoid_quantizer_with_kmeans_biases():
    from torch.nn import functional as F

    from cbp_kernels.quant import SigmoidConfig, SigmoidQuantizer

    net, x, y, loader = _toy()
    q = SigmoidQuantizer(net, "ternary", config=SigmoidConfig(lr=1e-2, kmeans_biases=True))
    layer = q.layers["2"]
    assert layer.biases is not None and layer.biases.shape == (2,)
    assert not torch.allclose(layer.biases, torch.tensor([-0.5, 0.5]))
    q.fit(loader, F.cross_entropy, epochs=3, progress=False)
    model, _ = q.finalize()
    assert set(torch.unique(model[2].weight / model[2].weight_scale).tolist()) <= {-1.0, 0.0, 1.0}
    with pytest.raises(ValueError, match="kmeans_biases"):
        SigmoidConfig(kmeans_biases="yes")  # None or a bool


@pytest.mark.parametrize("levels", ["binary", "2bit"])
def test_beta_starts_at_5p_over_4q(levels):
    """Quantization Networks' start: beta = 5p / (4q), p = max|level|, q = max|W| (for
    [-3, -1, 1, 3]: 3.75 / q, not 1.25 / q), alpha = 1 / beta."""
    from torch import nn

    from cbp_kernels.nn import SigmoidQuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q, p = float(lin.weight.detach().abs().max()), max(abs(v) for v in LEVELS[levels])
    layer = SigmoidQuantLinear.from_float(lin, LEVELS[levels])
    assert float(layer.beta.detach()) == pytest.approx(5 * p / (4 * q), rel=1e-6)
    assert float(layer.alpha.detach()) == pytest.approx(4 * q / (5 * p), rel=1e-6)


@pytest.mark.parametrize("device", devices())
def test_gradient_beyond_the_old_clamp_is_the_sigmoids(device):
    """No clamp of z = T (beta w - b) to [-10, 10]: at |z| = 12 .. 30 the gradient is the
    sigmoid's own, sig'(z) = e / (1 + e)^2 with e = exp(-|z|) (tiny, never 0), on every backend."""
    z = torch.tensor([-30.0, -12.0, 12.0, 30.0], device=device)
    beta, alpha = torch.tensor(1.0, device=device), torch.tensor(1.0, device=device)
    for b in ["reference"] + kernel_backends(device, **OP):
        w = z.clone().requires_grad_()  # binary: one sigmoid at b = 0, gap 2; T = 1
        sigmoid_quantize(w, alpha, beta, [-1.0, 1.0], 1.0, backend=b).sum().backward()
        e = torch.exp(-z.abs().double())
        want = (2 * e / (1 + e) ** 2).float()
        torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=0, msg=b)


def test_sigmoid_defaults_cluster_ternary_biases_and_clip_the_norm():
    """As the Quantization Networks code: k-means biases for ternary, the midpoint for binary;
    the total gradient norm clipped at 5 before each step."""
    from torch.nn import functional as F

    from cbp_kernels.quant import SigmoidConfig, SigmoidQuantizer

    assert SigmoidQuantizer(_toy()[0], "binary").layers["2"].biases is None
    assert SigmoidQuantizer(_toy()[0], "ternary").layers["2"].biases is not None
    net, x, y, _ = _toy()
    q = SigmoidQuantizer(net, "binary")
    q.step(F.cross_entropy(net(x) * 1000, y))
    norm = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm()
    assert float(norm) == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="clip"):
        SigmoidConfig(clip="both")
