"""The CBP quantizer: level sets and configs (every bad input), the quantized layers, the
epoch-end schedule on scripted L_sum sequences, exclusion, a toy model quantized end to
end, Algorithm 2's rescaling, atomic checkpoints with a resume after a real SIGKILL that is
bit-identical to an uninterrupted run, 2-rank DDP agreement (gloo, CPU) and the plots.

The file doubles as the worker script of its subprocess tests (``python test_quant.py ...``).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cbp_kernels.nn import QuantConv2d, QuantLinear
from cbp_kernels.ops import quantize
from cbp_kernels.ops.constraint import reference as R
from cbp_kernels.quant import (
    PRESETS, CBPConfig, CBPQuantizer, WindowSchedule, get_preset, load_checkpoint, next_g, plot_history,
    plot_weight_histograms, rescale_thresholds, resolve_levels, save_checkpoint, threshold_pairs,
)
from cbp_kernels.quant.checkpoint import rng_state, set_rng_state

from conftest import HANG_GUARD_S, devices, kernel_backends, wait_all

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "auto"  # the compiled CPU kernel when built (test_constraint.py checks it against the reference)
# every backend of the constraint pass that runs here (Triton on CPU under TRITON_INTERPRET=1)
PASS_BACKENDS = ["reference"] + kernel_backends("cpu", "constraint_pass", "cbp_kernels.ops.constraint")


def _mlp(widths=(8, 16, 16, 16, 4), dropout=0.0):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)] if dropout else [nn.ReLU()]
    return nn.Sequential(*layers)


def _data(n=128, seed=0, batch_size=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def _cfg(**kw):
    return CBPConfig(**{"lr": 0.02, "momentum": 0.0, "lr_multiplier": 0.1, "p_max": 1, **kw})


# --- level sets and configs ---------------------------------------------------------------------

def test_levels_resolve():
    assert resolve_levels("binary").tolist() == [-1.0, 1.0]
    assert resolve_levels("ternary").tolist() == [-1.0, 0.0, 1.0]
    assert resolve_levels([-2, -1, 0, 1]).tolist() == [-2.0, -1.0, 0.0, 1.0]
    t = resolve_levels(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert t.dtype == torch.float32 and t.tolist() == [-0.5, 0.5]


@pytest.mark.parametrize("levels,error,match", [
    ([], ValueError, "at least two"), ([1.0], ValueError, "at least two"), ([1.0, -1.0], ValueError, "sorted"),
    ([-1.0, 0.0, 0.0, 1.0], ValueError, "duplicate"), ([-1.0, float("nan")], ValueError, "finite"),
    ([-1.0, float("inf")], ValueError, "finite"), ("quaternary", ValueError, "binary"), (["a", "b"], TypeError, "real"),
    ([True, False], TypeError, "real"), (3, TypeError, "levels"), (torch.zeros(2, 2), TypeError, "1-D"),
])
def test_levels_bad(levels, error, match):
    with pytest.raises(error, match=match):
        resolve_levels(levels)


@pytest.mark.parametrize("field,value", [
    ("g", 0), ("g", 1.5), ("p_max", 0), ("lr", 0.0), ("lr", -1.0), ("lr", float("nan")),
    ("lr_multiplier", float("inf")),
    ("lr_bias", 0.0), ("momentum", -0.1), ("weight_decay", float("nan")), ("optimizer", "rmsprop"),
    ("multiplier_optimizer", "sgd"), ("epochs", 0), ("batch_size", True), ("lr_drop_g", 1), ("grad_clip", 0),
    ("calibration", 1),
])
def test_config_bad(field, value):
    with pytest.raises(ValueError, match=field):
        CBPConfig(**{field: value})


def test_presets_match_table4():
    # (eta_w, w_d, eta_b, eta_lambda, batch, epochs, timesteps, weight opt, multiplier opt, lr drop)
    table = {
        # w_d: Table 4 gives none; the authors' TSSL-BP code runs torch's AdamW default 0.01
        "tssl-bp/cifar10": (2e-4, 0.01, None, 1e-4, 50, 200, 5, "adamw", "adamw", None),
        "stbp/cifar10": (5e-3, 0, None, 5e-4, 50, 100, 8, "sgd", "adam", 20),
        "stbp/cifar100": (5e-3, 0, None, 5e-4, 50, 100, 8, "sgd", "adam", 20),
        "sew-resnet/dvs128-gesture": (0.1, 0, None, 0.01, 16, 200, 16, "sgd", "adam", 20),
        "sew-resnet/cifar10-dvs": (0.1, 0, None, 0.01, 16, 64, 16, "sgd", "adam", 20),
        "sew-resnet/imagenet": (0.1, 0, None, 0.01, 32, 100, 4, "sgd", "adam", 20),
        "snn-calib/cifar10": (0.01, 1e-4, 0.01, 1e-3, 128, 100, 32, "sgd", "adam", 20),
        "snn-calib/cifar100": (0.01, 1e-4, 0.01, 1e-3, 128, 100, 32, "sgd", "adam", 20),
    }
    assert set(PRESETS) == set(table)
    for name, row in table.items():
        c = get_preset(name)
        got = (c.lr, c.weight_decay, c.lr_bias, c.lr_multiplier, c.batch_size, c.epochs, c.timesteps, c.optimizer,
               c.multiplier_optimizer, c.lr_drop_g)
        assert got == row, name
        assert c.calibration == name.startswith("snn-calib")
        # the authors' code: TSSL-BP trains the quantized weights only, clips by norm, clamps
        # the other layers to +-4; SNN-Calibration rescales the spiking layers, clamps no bias
        tssl = name.startswith("tssl")
        assert (c.train_params, c.clip, c.other_weight_clip) == (("quantized", "norm", 4.0) if tssl else
                                                                 ("all", "value", None)), name
        assert c.rescale_layers == ("spiking" if c.calibration else "all") and c.bias_clip is None, name
        assert c.timesteps_train == (12 if name == "sew-resnet/dvs128-gesture" else None), name
    with pytest.raises(ValueError, match="known presets"):
        get_preset("stbp/mnist")


# --- the schedule -------------------------------------------------------------------------------

def _run_schedule(seq, p_max=20, g=1):
    s = WindowSchedule(p_max, g)
    return [(s.end_epoch(v), s.g, s.p) for v in seq]


def test_schedule_scripted():
    falling = _run_schedule([10.0 - i for i in range(7)], p_max=3)
    assert [u for u, _, _ in falling] == [False, False, True, False, False, True, False]  # only p_max forces updates
    assert [g for _, g, _ in falling] == [1, 1, 2, 2, 2, 3, 3]
    rising = _run_schedule([1.0, 2.0, 3.0, 4.0, 5.0])
    # epoch 1: L_pre = 1e10 -> no update; then every rise updates, which resets L_pre to 1e10
    assert [u for u, _, _ in rising] == [False, True, False, True, False]
    flat = _run_schedule([5.0] * 5)
    assert [u for u, _, _ in flat] == [False, True, False, True, False]  # L_sum >= L_pre: equal counts
    assert _run_schedule([1e10])[0][0]  # L_sum >= the initial L_pre
    p_max = _run_schedule([9.0, 8.0, 7.0, 6.0, 5.0], p_max=2)
    assert [(u, p) for u, _, p in p_max] == [(False, 1), (True, 0), (False, 1), (True, 0), (False, 1)]


def test_g_increments():
    g, seen = 1, []
    for _ in range(13):
        g = next_g(g)
        seen.append(g)
    assert seen == [2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50]
    s = WindowSchedule(p_max=1, g=1)
    assert [s.end_epoch(1.0) and s.g for _ in range(11)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30]
    with pytest.raises(ValueError, match="g must"):
        WindowSchedule(g=0)


@pytest.mark.parametrize("preset_drop", [20, None])
def test_end_epoch_lr_drop_and_lambda_update(preset_drop):
    model = _mlp()
    q = CBPQuantizer(model, "ternary", config=_cfg(p_max=1, lr=0.5, lr_drop_g=preset_drop), backend=BACKEND)
    lr0 = q.weight_optimizer.param_groups[0]["lr"]
    lrs, changed = [], []
    for _ in range(11):  # p_max = 1: every epoch updates; g: 2..10, 20, 30
        before = [lam.clone() for lam in q.lambdas]
        record = q.end_epoch(1.0)
        assert record["updated"]
        lrs.append(record["lr"])
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, q.lambdas)))
    assert q.g == 30
    expected = [lr0] * 9 + [lr0 * 0.1] * 2 if preset_drop else [lr0] * 11
    assert lrs == pytest.approx(expected)
    assert all(changed)  # the weights are far from the levels: cs(W; g) > 0 once g > 1
    # no update (L_sum fell), no lambda step
    q2 = CBPQuantizer(_mlp(), "binary", config=_cfg(p_max=20), backend=BACKEND)
    q2.end_epoch(5.0)
    before = [lam.clone() for lam in q2.lambdas]
    record = q2.end_epoch(4.0)
    assert not record["updated"] and q2.g == 1 and q2.L_pre == 4.0
    assert all(torch.equal(a, b) for a, b in zip(before, q2.lambdas))


def test_lambda_step_is_ascent_on_cs():
    torch.manual_seed(1)
    model = _mlp()
    q = CBPQuantizer(model, "binary", config=_cfg(lr_multiplier=0.25, p_max=20), backend=BACKEND)
    q.end_epoch(1.0)
    q.end_epoch(2.0)  # rises: g -> 2 and one ascent step with dL/dlambda = cs(W; 2)
    assert q.g == 2
    # the same two Adam ascent steps (the one before the first epoch at g = 1, then at g = 2), by hand
    for w, lam, s in zip(q.weights, q.lambdas, q.scales):
        m = v = torch.zeros_like(w)
        expected = torch.zeros_like(w)
        for t, g in ((1, 1), (2, 2)):
            cs = R.cs(w.detach(), q.levels, s, g)
            m, v = 0.9 * m + 0.1 * cs, 0.999 * v + 0.001 * cs * cs
            expected = expected + 0.25 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        assert bool((R.cs(w.detach(), q.levels, s, 2) > 0).any())
        torch.testing.assert_close(lam, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_multiplier_optimizer_is_torch_adam_ascent(name):
    """The quantizer's fused multiplier update = torch.optim.Adam / AdamW(maximize=True, their
    defaults) stepped on lambda.grad = cs(W; g), to a few ulp, over three updates (g = 1, 2, 3);
    its Adam state survives a state_dict round trip into a fresh quantizer."""
    torch.manual_seed(2)
    q = CBPQuantizer(_mlp(), "ternary", config=_cfg(lr_multiplier=0.05, p_max=1, multiplier_optimizer=name),
                     backend=BACKEND)
    lambdas = [torch.zeros_like(w) for w in q.weights]
    opt = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(lambdas, lr=0.05, maximize=True)
    for g in (1, 2, 3):
        if g > 1:
            assert q.end_epoch(1.0)["updated"] and q.g == g
        for w, lam, s in zip(q.weights, lambdas, q.scales):
            lam.grad = R.cs(w.detach(), q.levels, s, g)
        opt.step()
    assert q.multiplier_steps == 3
    for mine, torchs in ((q.lambdas, lambdas), (q.exp_avgs, [opt.state[lam]["exp_avg"] for lam in lambdas]),
                         (q.exp_avg_sqs, [opt.state[lam]["exp_avg_sq"] for lam in lambdas])):
        for a, b in zip(mine, torchs):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    fresh = CBPQuantizer(_mlp(), "ternary", config=_cfg(lr_multiplier=0.05, p_max=1, multiplier_optimizer=name),
                         backend=BACKEND)
    fresh.load_state_dict(q.state_dict())
    assert fresh.multiplier_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.lambdas + fresh.exp_avgs + fresh.exp_avg_sqs,
                                                 q.lambdas + q.exp_avgs + q.exp_avg_sqs))



def test_quantized_layers_share_parameters_and_quantize():
    lin, conv = nn.Linear(5, 3), nn.Conv2d(2, 4, 3, padding=1)
    levels = resolve_levels("ternary")
    for layer, cls, x in ((lin, QuantLinear, torch.randn(7, 5)), (conv, QuantConv2d, torch.randn(2, 2, 6, 5))):
        keys = set(layer.state_dict())
        q = cls.from_float(layer, levels)
        q.quant_backend = BACKEND
        assert isinstance(q, cls) and isinstance(q, type(layer))
        assert q.weight is layer.weight and q.bias is layer.bias
        assert set(q.state_dict()) == keys | {"levels", "weight_scale"}
        assert float(q.weight_scale) == pytest.approx(float(layer.weight.detach().abs().mean()))
        wq = quantize(layer.weight, levels, q.weight_scale, backend=BACKEND)
        assert set(wq.unique().tolist()) <= {float(v) for v in levels * q.weight_scale}
        x.requires_grad_(True)
        out = q(x)
        torch.testing.assert_close(out, layer._conv_forward(x, wq, layer.bias) if cls is QuantConv2d
                                   else nn.functional.linear(x, wq, layer.bias))
        out.sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0  # straight-through


def test_quantized_layers_constructed_directly():
    levels = resolve_levels([-2, -1, 0, 1])
    for q, x in ((QuantLinear(4, 3, levels=levels), torch.randn(2, 4)),
                 (QuantConv2d(2, 3, 3, bias=False, levels=levels), torch.randn(1, 2, 5, 5))):
        q.quant_backend = BACKEND
        assert float(q.weight_scale) == pytest.approx(float(q.weight.detach().abs().mean()))
        assert not q.weight_scale.requires_grad and "weight_scale" not in dict(q.named_parameters())
        wq = q.quantized_weight().detach()
        assert set(wq.unique().tolist()) <= {float(v) for v in levels * q.weight_scale}
        assert q(x).shape[:2] == (x.shape[0], 3)


def test_quantized_weight_follows_its_buffers():
    """A quantized layer makes its level table once (``ops.quantize_table``) and again whenever
    a buffer changes in place (``load_state_dict``, ``mul_``) or is replaced, or the backend
    changes: Q(W) is always ``ops.quantize`` of the current buffers, and a bad scale set
    after the first call still raises."""
    q = QuantConv2d(3, 5, 3, levels=resolve_levels("ternary"))

    def same():
        return torch.equal(q.quantized_weight(), quantize(q.weight, q.levels, q.weight_scale))

    assert same()
    q.weight_scale = torch.tensor(0.01)  # a new buffer object (at the same _version, 0)
    assert same()
    with torch.no_grad():
        q.weight_scale.mul_(3.0)
    assert same()
    q.load_state_dict({**q.state_dict(), "levels": torch.tensor([-2.0, 0.0, 1.0])})
    assert same()
    q.quant_backend = "reference"
    assert same()
    with torch.no_grad():
        q.weight_scale.fill_(-1.0)
    with pytest.raises(ValueError, match="scale"):
        q.quantized_weight()


def test_spikingjelly_subclass_keeps_step_mode():
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")  # lifted by installing spikingjelly
    conv = sj_layer.Conv2d(2, 3, 3, step_mode="m")
    q = QuantConv2d.from_float(conv, resolve_levels("binary"))
    q.quant_backend = BACKEND
    assert isinstance(q, QuantConv2d) and isinstance(q, sj_layer.Conv2d) and q.step_mode == "m"
    out = q(torch.randn(4, 2, 2, 5, 5))  # [T, N, C, H, W]: SpikingJelly's multi-step path
    assert out.shape == (4, 2, 3, 3, 3)
    wq = quantize(conv.weight, q.levels, q.weight_scale, backend=BACKEND)
    assert set(wq.unique().tolist()) == {float(-q.weight_scale), float(q.weight_scale)}


def test_from_float_rejects():
    with pytest.raises(TypeError, match="unquantized"):
        QuantLinear.from_float(nn.ReLU(), resolve_levels("binary"))
    with pytest.raises(TypeError, match="cannot convert"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1), resolve_levels("binary"))


# --- exclusion and bad models ---------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.act(self.stem(x))).mean((2, 3)))


def _quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)))


@pytest.mark.parametrize("exclude,expected", [
    (None, ["body.0", "body.2"]), ([], ["body.0", "body.2", "head", "stem"]), (["body"], ["head", "stem"]),
    (["stem", "body.2"], ["body.0", "head"]),
])
def test_exclude(exclude, expected):
    model = _Net()
    q = CBPQuantizer(model, "binary", exclude=exclude, backend=BACKEND)
    assert _quantized_names(model) == expected == sorted(q.layers)
    assert model(torch.randn(2, 1, 9, 9)).shape == (2, 2)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"exclude": ["nope"]}, ValueError, "not a module"), ({"exclude": ["act"]}, ValueError, "no quantizable"),
    ({"exclude": "stem"}, TypeError, "list"), ({"exclude": ["stem", "body", "head"]}, ValueError, "no layer left"),
    ({"levels": [1.0, 0.0]}, ValueError, "sorted"), ({"levels": []}, ValueError, "two"),
    ({"preset": "nope"}, ValueError, "known presets"),
    ({"preset": "stbp/cifar10", "config": CBPConfig()}, ValueError, "not both"),
    ({"config": {"lr": 1}}, TypeError, "CBPConfig"),
])
def test_bad_input_changes_nothing(kwargs, error, match):
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        CBPQuantizer(model, **{"levels": "binary", **kwargs})
    assert _quantized_names(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_models():
    with pytest.raises(ValueError, match="no quantizable layer"):
        CBPQuantizer(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="first and last"):
        CBPQuantizer(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        CBPQuantizer(model)
    model = _mlp()
    with torch.no_grad():
        model[2].weight.zero_()
    with pytest.raises(ValueError, match="all-zero"):
        CBPQuantizer(model)
    model = _mlp()
    model[4].double()
    with pytest.raises(ValueError, match="one dtype"):
        CBPQuantizer(model)
    model = _Net().to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="non-contiguous"):
        CBPQuantizer(model)
    assert _quantized_names(model) == []


def test_nan_loss_and_weights_stop_cleanly(tmp_path):
    model = _mlp()
    q = CBPQuantizer(model, "binary", config=_cfg(), backend=BACKEND)
    before = [w.detach().clone() for w in q.weights]
    with pytest.raises(FloatingPointError, match="loss is nan"):
        q.step(model(torch.randn(4, 8)).sum() * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, q.weights))
    # a weight turns NaN mid-run: fit stops with a message, the last checkpoint stays intact
    q.fit(_data(), nn.functional.cross_entropy, epochs=1, checkpoint_dir=tmp_path, progress=False)

    def poisoned(m, x):
        if q._batch == 2:
            with torch.no_grad():
                q.weights[0][0, 0] = float("inf")
        return m(x)

    with pytest.raises(FloatingPointError, match="intact"):
        q.fit(_data(), nn.functional.cross_entropy, epochs=2, forward_fn=poisoned, checkpoint_dir=tmp_path,
              checkpoint_every=1, progress=False)
    saved = (tmp_path / "last.pt").read_bytes()
    state = load_checkpoint(tmp_path / "last.pt")  # the one written after batch 2, before the Inf
    assert (state["epoch"], state["batch"]) == (1, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    with pytest.raises(FloatingPointError, match="not checkpointing"):
        q.save_checkpoint(tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == saved


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", PASS_BACKENDS)
def test_toy_model_end_to_end(tmp_path, backend):
    torch.manual_seed(0)
    model = _mlp()
    q = CBPQuantizer(model, "ternary", config=_cfg(lr_drop_g=6), backend=backend)
    cfs0 = q.cfs()
    history = q.fit(_data(), nn.functional.cross_entropy, epochs=15, progress=False)
    assert [r["epoch"] for r in history] == list(range(15))
    cfs = [r["cfs"] for r in history]
    assert cfs[-1] < 0.2 * cfs0 and cfs[-1] < cfs[len(cfs) // 2]
    assert q.g == 70 and history[-1]["lr"] == pytest.approx(0.002)
    model, export = q.finalize()
    assert q.cfs() == 0.0
    assert sorted(export) == ["2", "4"]
    for name, layer in q.layers.items():
        e = export[name]
        assert e["codes"].dtype == torch.int8 and e["levels"] == [-1.0, 0.0, 1.0]
        assert torch.equal(layer.weight.detach(), torch.tensor(e["levels"])[e["codes"].long()] * layer.weight_scale)
        assert torch.equal(R.cs(layer.weight.detach(), layer.levels, layer.weight_scale, 1, windowed=False),
                           torch.zeros_like(layer.weight))
    # the plots of the run
    p1 = plot_history(history, tmp_path / "curves.png")
    p2 = plot_weight_histograms(history, [0, 7, 14], tmp_path / "hist.png", levels=[-1, 0, 1])
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="recorded epochs"):
        plot_weight_histograms(history, [99], tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "x.png")


def test_finalize_records_cfs_before_and_weights_moved():
    torch.manual_seed(0)
    model = _mlp()
    q = CBPQuantizer(model, "ternary", config=_cfg(), backend=BACKEND)
    with torch.no_grad():  # every weight on the level s, but 156 of layer 2 off by 2 % of the step s
        for name, layer in q.layers.items():
            layer.weight.fill_(float(layer.weight_scale))
        q.layers["2"].weight.view(-1)[100:] *= 0.98
        q.layers["4"].weight.view(-1)[:10] *= 0.995  # within the 1 % tolerance: not counted
    cfs = q.cfs()
    q.finalize()
    assert q.cfs_before == cfs > 0 and q.cfs() == 0
    assert q.forced_fraction == 156 / q.num_weights


def test_ops_under_cpu_bf16_autocast():
    """DigitsNet quantized, forward under CPU bf16 autocast: the custom neuron op runs in bf16
    (as its reference on the same input), the quantize op on the float32 master weights, the
    output near the float32 one, gradients float32 and finite."""
    from cbp_kernels.models import DigitsNet
    from cbp_kernels.ops import multistep_neuron

    torch.manual_seed(0)
    net = DigitsNet()
    CBPQuantizer(net, "binary", backend=BACKEND)
    seen = {}
    net.lif2.register_forward_hook(lambda m, i, o: seen.update(x=i[0], s=o))
    x = torch.rand(4, 8, 1, 8, 8)
    ref = net(x).mean(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x).mean(0)
    assert seen["x"].dtype == torch.bfloat16 and seen["s"].dtype == torch.bfloat16
    spikes, _ = multistep_neuron(seen["x"].detach(), neuron="lif", tau=2.0, backend="reference")
    assert torch.equal(seen["s"].detach(), spikes)
    torch.testing.assert_close(out.float(), ref, atol=0.02 * float(ref.detach().abs().max()), rtol=0)
    out.float().sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    # LIFConv2d (the SEW-ResNet layers): its conv autograd function backpropagates in the
    # autocast dtype and returns float32 gradients
    import cbp_kernels

    layer = cbp_kernels.LIFConv2d(4, 8, 3, padding=1, neuron="lif", tau=2.0, surrogate_function="atan")
    x = torch.rand(4, 2, 4, 8, 8)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes = layer(x)
    assert spikes.dtype == torch.bfloat16 and float((spikes.float() != ref).float().mean()) < 0.1
    spikes.float().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert len(grads) == 3 and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


def test_any_loss_and_eval_fn():
    torch.manual_seed(0)
    model = _mlp()
    q = CBPQuantizer(model, [-2, -1, 0, 1], config=_cfg(), backend=BACKEND)

    def mse_on_counts(out, y):  # MSE against one-hot "spike counts"
        return ((out - nn.functional.one_hot(y, 4).float()) ** 2).mean()

    history = q.fit(_data(), mse_on_counts, epochs=2, eval_fn=lambda m: {"accuracy": 0.5, "top5": 1.0}, progress=True)
    assert history[-1]["accuracy"] == 0.5 and history[-1]["top5"] == 1.0
    assert sum(history[-1]["weight_hist"]) == q.num_weights


# --- Algorithm 2 -------------------------------------------------------------------------------------

class _Neuron(nn.Module):
    def __init__(self, v_threshold):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x):
        return x


def test_rescale_thresholds_hand_checked():
    l1, l2, l3 = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        for layer in (l1, l2, l3):
            layer.weight.fill_(1.0)
            layer.bias.fill_(1.0)
    n1, n2 = _Neuron(2.0), _Neuron(4.0)
    model = nn.Sequential(l1, n1, l2, n2, l3)
    pairs = threshold_pairs(model)
    assert [(a, b) for a, b in pairs] == [(l1, n1), (l2, n2), (l3, None)]
    assert rescale_thresholds(pairs) == [2.0, 4.0, 1.0]
    # W1 * 1/2, b1 / 2 | W2 * 2/4, b2 / 4 | W3 * 4/1, b3 / 1
    assert l1.weight.unique().tolist() == [0.5] and l1.bias.unique().tolist() == [0.5]
    assert l2.weight.unique().tolist() == [0.5] and l2.bias.unique().tolist() == [0.25]
    assert l3.weight.unique().tolist() == [4.0] and l3.bias.unique().tolist() == [1.0]
    assert n1.v_threshold == 1.0 and n2.v_threshold == 1.0
    with pytest.raises(ValueError, match="> 0"):
        rescale_thresholds([(nn.Linear(1, 1), _Neuron(0.0))])


def test_step_clamps_quantized_weights_to_weight_clip():
    """After each step every quantized weight lies in [-weight_clip, weight_clip] (the paper's
    clamp to [-1, 1]) and the step pushed some to the bound; the excluded first and last layers
    are not clamped."""
    torch.manual_seed(0)
    model = _mlp()
    q = CBPQuantizer(model, "binary", config=_cfg(lr=50.0, weight_clip=0.5), backend=BACKEND)
    q.step(-model(torch.randn(32, 8)).abs().sum())  # clipped gradients of 1 times lr 50: far past 0.5
    quantized = torch.cat([w.detach().flatten() for w in q.weights])
    assert len(q.weights) == 2 and float(quantized.abs().max()) == 0.5
    assert float(model[0].weight.detach().abs().max()) > 0.5  # excluded: not clamped


def test_rescale_spiking_only_leaves_the_classifier():
    l1, l2 = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        for layer in (l1, l2):
            layer.weight.fill_(1.0)
            layer.bias.fill_(1.0)
    rescale_thresholds(threshold_pairs(nn.Sequential(l1, _Neuron(2.0), l2)), spiking_only=True)
    assert l1.weight.unique().tolist() == [0.5] and l1.bias.unique().tolist() == [0.5]
    assert l2.weight.unique().tolist() == [1.0] and l2.bias.unique().tolist() == [1.0]  # not x theta(L-1) = 2


def test_calibration_preset_never_clamps_biases():
    torch.manual_seed(0)
    lin = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)]
    with torch.no_grad():
        lin[1].bias.fill_(3.6)  # / theta 2 = 1.8: beyond the old clamp at 1
    model = nn.Sequential(lin[0], _Neuron(2.0), lin[1], _Neuron(2.0), lin[2])
    w2 = lin[2].weight.detach().clone()
    q = CBPQuantizer(model, "binary", preset="snn-calib/cifar10", exclude=["0", "4"], backend=BACKEND)
    assert torch.equal(lin[2].weight.detach(), w2)  # the classifier is not rescaled (authors' code)
    q.step(((model(torch.randn(16, 8)) - 3) ** 2).mean())
    assert float(lin[1].bias.detach().max()) > 1.5


def _tssl_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 4, bias=False))


def test_tssl_preset_trains_quantized_only_clips_norm_and_clamps_others():
    model = _tssl_mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = 7.0  # beyond the other layers' clamp at 4
    first, last = model[0].weight.detach().clone(), model[4].weight.detach().clone()
    q = CBPQuantizer(model, "ternary", preset="tssl-bp/cifar10", backend=BACKEND)
    assert [g["name"] for g in q.weight_optimizer.param_groups] == ["quantized"]
    assert q.weight_optimizer.param_groups[0]["weight_decay"] == 0.01
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    grads = []
    for _ in range(2):
        q.step(nn.functional.cross_entropy(model(x) * 50, y))
        grads.append(model[0].weight.grad.clone())
    assert torch.equal(model[0].weight.detach(), first)  # not trained
    assert float(model[4].weight.detach()[0, 0]) == 4.0 and torch.equal(model[4].weight.detach()[1:], last[1:])
    # the frozen layers' gradients are never zeroed (they accumulate, as in the authors' code) and
    # the clip scaled every gradient to a total norm of 1
    assert not torch.equal(grads[0], grads[1])
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-5)


def test_frozen_grads_resume(tmp_path):
    model = _tssl_mlp()
    q = CBPQuantizer(model, "binary", preset="tssl-bp/cifar10", backend=BACKEND)
    q.step(nn.functional.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 4, (8,))))
    q.save_checkpoint(tmp_path / "last.pt")
    model2 = _tssl_mlp()
    q2 = CBPQuantizer(model2, "binary", preset="tssl-bp/cifar10", backend=BACKEND)
    q2.load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(model2[0].weight.grad, model[0].weight.grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_float32_master_weights(amp, device):
    torch.manual_seed(0)
    model = _mlp().to(device)
    q = CBPQuantizer(model, "binary", config=_cfg(amp=amp), backend=BACKEND)
    history = q.fit(_data(), nn.functional.cross_entropy, epochs=3, progress=False)
    assert all(math.isfinite(r["L_sum"]) for r in history)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(lam.dtype == torch.float32 for lam in q.lambdas)
    assert (q.scaler is not None) == (amp == "fp16")


def test_amp_scaled_clip_is_the_authors_clip_of_scaled_gradients():
    """amp_clip="scaled" clips at grad_clip / S: with a fixed scale S = 2^10 and a clip of 1,
    every gradient ends within 2^-10, as clip_grad_value_ of the scaled gradients at 1 gives."""
    torch.manual_seed(0)
    model = _mlp()
    q = CBPQuantizer(model, "binary", config=_cfg(amp="fp16", amp_clip="scaled", lr=1.0, momentum=0.0),
                     backend=BACKEND)
    q.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x) * 100, y)
    q.step(loss)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(grads.abs().max()) == 2.0**-10
    steps = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())
                       if p is not model[2].weight])  # SGD lr 1: the step is the clipped gradient
    assert float(steps.abs().max()) <= 2.0**-10 * (1 + 1e-6)


def test_calibration_config_trains_clamped_biases():
    torch.manual_seed(0)
    lin = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)]
    model = nn.Sequential(lin[0], _Neuron(2.0), lin[1], _Neuron(2.0), lin[2])
    w1 = lin[1].weight.detach().clone()
    cfg = dataclasses.replace(get_preset("snn-calib/cifar10"), lr_bias=0.5, bias_clip=0.05)
    q = CBPQuantizer(model, "binary", config=cfg, exclude=[], backend=BACKEND)
    torch.testing.assert_close(lin[1].weight.detach(), w1 * 2.0 / 2.0)
    groups = {g["name"]: g for g in q.weight_optimizer.param_groups}
    assert groups["bias"]["lr"] == 0.5 and groups["quantized"]["weight_decay"] == 1e-4
    assert groups["bias"]["weight_decay"] == 0.0
    x = torch.randn(16, 8)
    q.step(((model(x) - 3) ** 2).mean())
    assert max(float(layer.bias.detach().abs().max()) for layer in lin) == pytest.approx(0.05)  # clamped at bias_clip


# --- checkpoints and resume after SIGKILL ----------------------------------------------------------------

def test_checkpoint_atomic_and_rng_roundtrip(tmp_path):
    state = rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    path = save_checkpoint(tmp_path / "c.pt", {"x": torch.arange(3), "rng": rng_state()})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    assert load_checkpoint(path)["x"].tolist() == [0, 1, 2]


def _kill_run(out_dir: Path, resume: bool, epochs: int = 3):
    """The subprocess worker: a dropout MLP quantized for ``epochs`` epochs, checkpointing
    every batch; prints one line per step; writes the final state when done."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _mlp(dropout=0.2)
    q = CBPQuantizer(model, "ternary", config=_cfg(p_max=2), backend=BACKEND)

    def forward(m, x):
        out = m(x)
        print("step", flush=True)
        return out

    q.fit(_data(n=96, batch_size=16), nn.functional.cross_entropy, epochs=epochs, forward_fn=forward,
          checkpoint_dir=out_dir, checkpoint_every=1, resume=resume, progress=False)
    torch.save({"weights": [p.detach() for p in model.parameters()], "lambdas": q.lambdas, "g": q.g,
                "history": q.history}, out_dir / "final.pt")


def _worker_env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, __file__, "kill-run"]
    proc = subprocess.Popen(cmd + [str(killed), "0"], stdout=subprocess.PIPE, text=True, env=_worker_env())
    try:
        steps = 0
        for line in proc.stdout:  # 6 batches per epoch: kill in the middle of the second epoch
            steps += line.startswith("step")
            if steps == 8:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "final.pt").exists()
    saved = load_checkpoint(killed / "last.pt")
    assert saved["epoch"] == 1 and 0 < saved["batch"] < 6  # killed mid-epoch
    subprocess.run(cmd + [str(killed), "1"], check=True, env=_worker_env(), stdout=subprocess.DEVNULL,
                   timeout=HANG_GUARD_S)
    threads = torch.get_num_threads()
    try:
        _kill_run(clean, resume=False)  # the uninterrupted run, in this process
    finally:
        torch.set_num_threads(threads)
    a, b = torch.load(killed / "final.pt"), torch.load(clean / "final.pt")
    assert a["g"] == b["g"] and a["history"] == b["history"]
    assert all(torch.equal(x, y) for x, y in zip(a["weights"] + a["lambdas"], b["weights"] + b["lambdas"]))


# --- 2-rank DDP ---------------------------------------------------------------------------------------------

def _ddp_run(out_dir: Path):
    """The worker of one rank (RANK in the environment; gloo over loopback, a file store)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_GUARD_S))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_mlp())
    q = CBPQuantizer(model, "binary", config=_cfg(p_max=20), backend=BACKEND)
    q.fit(_data(n=64, seed=rank), nn.functional.cross_entropy, epochs=3, progress=False)  # different data per rank
    # scripted: the ranks' own L_sums disagree on the decision; the summed one decides for both
    q.end_epoch(5e10)  # sum 1e11 >= any L_pre: update, L_pre = 1e10
    q.end_epoch(5.0)  # sum 10: no update, L_pre = 10
    decision = q.end_epoch([4.0, 7.0][rank])["updated"]  # rank 0 falls, rank 1 rises; the sum 11 rises
    torch.save({"weights": [p.detach() for p in model.parameters()], "lambdas": q.lambdas, "g": q.g,
                "history": q.history, "decision": decision}, out_dir / f"rank{rank}.pt")
    dist.barrier()  # both results are on disk
    # The worker ends without torch's teardown: destroy_process_group hung once under load and
    # the interpreter's exit can abort a gloo rank (pytorch/pytorch#190489); cli.entry does the same.
    sys.stdout.flush()
    os._exit(0)


def test_ddp_two_ranks_agree(tmp_path):
    env = {**_worker_env(), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, __file__, "ddp-run", str(tmp_path)], env={**env, "RANK": str(r)})
             for r in range(2)]
    assert wait_all(procs) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["decision"] is True and r1["decision"] is True and r0["g"] == r1["g"]
    assert [h["L_sum"] for h in r0["history"]] == [h["L_sum"] for h in r1["history"]]
    assert all(torch.equal(x, y) for x, y in zip(r0["weights"] + r0["lambdas"], r1["weights"] + r1["lambdas"]))


if __name__ == "__main__":
    task, out = sys.argv[1], Path(sys.argv[2])
    if task == "kill-run":
        _kill_run(out, resume=sys.argv[3] == "1")
    elif task == "ddp-run":
        _ddp_run(out)
    else:
        raise SystemExit(f"unknown worker task {task!r}")


def test_weight_step_is_torchs_per_tensor_sgd_and_clip_bit_for_bit():
    """The quantizer's SGD step (torch's fused kernel on CPU) and its clip by value (one clamp
    per gradient) update every parameter exactly as torch's per-tensor SGD after
    ``clip_grad_value_``: three steps of a toy model from the same state and gradients."""
    from cbp_kernels.quant.trainer import clip_grad_value

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    q = CBPQuantizer(net, "binary", exclude=[], config=CBPConfig(optimizer="sgd", lr=0.1, momentum=0.9))
    assert q.weight_optimizer.param_groups[0]["fused"]
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    plain = torch.optim.SGD(twin, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, t in zip(net.parameters(), twin):
            p.grad = torch.randn(p.shape, generator=gen) * 3
            t.grad = p.grad.clone()
        clip_grad_value(list(net.parameters()), 1.0)
        q.weight_optimizer.step()
        torch.nn.utils.clip_grad_value_(twin, 1.0)
        plain.step()
        for p, t in zip(net.parameters(), twin):
            assert torch.equal(p.grad, t.grad) and torch.equal(p, t)
