"""The models against SpikingJelly's own (same random weights loaded through the interop:
outputs and every gradient, in lock-step: ATen's float32 convolutions, as SpikingJelly's),
checkpoints in SpikingJelly's and the original repository's key
layouts, every model's structure and shapes, memory_report against hand counts and the
paper's tables, and bad checkpoints."""
from __future__ import annotations

import argparse
import copy
import re
import types

import pytest
import torch

import cbp_kernels
from cbp_kernels import memory_report, models
from bench.peers import spikingjelly_model_zoo
from cbp_kernels.models.interop import CheckpointError, load_checkpoint, save_spikingjelly, to_spikingjelly

from conftest import assert_close, needs_spikingjelly


@pytest.fixture(scope="module")
def sj():
    from spikingjelly.activation_based import functional, neuron, surrogate

    zoo = spikingjelly_model_zoo()  # torchvision is stubbed for the import when absent
    return types.SimpleNamespace(functional=functional, neuron=neuron, surrogate=surrogate,
                                 sew_resnet=zoo.sew_resnet, spiking_resnet=zoo.spiking_resnet)


def _sj_model(sj, name, **kw):
    zoo = sj.sew_resnet if name.startswith("sew") else sj.spiking_resnet
    net = getattr(zoo, name)(spiking_neuron=sj.neuron.IFNode, surrogate_function=sj.surrogate.ATan(),
                             detach_reset=True, **kw)
    sj.functional.set_step_mode(net, "m")
    return net


def _randomize(net):
    """Random BN affine parameters and running statistics (default ones hide mapping bugs)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.6)
                m.bias.uniform_(-0.2, 0.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture
def lock_step(monkeypatch):
    """ATen's float32 convolutions everywhere (``CBP_KERNELS_NO_AMX=1``: the tile ops run ATen's
    own calls), SpikingJelly's rounding, so the comparisons can be tight. On AMX-BF16 the spiking
    convolutions sum exact products in another order than oneDNN (tests/test_conv_input_grad.py,
    test_conv_weight_grad.py bound each op; tests/test_lifconv.py checks the layers' dispatch):
    a spiking network amplifies such last-bit differences wherever a membrane potential lies
    within them of the threshold (a flipped spike, then its consequences), as it would on any
    other float32 library; measured: SEW-ResNet-18 at 64 x 64, 2 of 32768 spikes of layer1.1's
    first conv flipped, then every later layer differed."""
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1")


def _compare(ours, theirs, sj, x):
    """Outputs, input grads and every parameter grad (in SpikingJelly's names), train then eval."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert_close(ya, yb, 1e-4, 1e-4, "train output")
    assert_close(xa.grad, xb.grad, 1e-4, 1e-3, "grad input")
    ours_grads = to_spikingjelly({k: p.grad for k, p in ours.named_parameters()})
    theirs_params = dict(theirs.named_parameters())
    assert set(ours_grads) == set(theirs_params)
    for k, gr in ours_grads.items():
        assert_close(gr, theirs_params[k].grad, 1e-4, 1e-3, f"grad {k}")
    for k, v in theirs.state_dict().items():  # running statistics after the training step
        assert_close(to_spikingjelly(ours)[k], v, 1e-5, 1e-5, f"state {k}")
    ours.reset()
    sj.functional.reset_net(theirs)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-4, 1e-4, "eval output (BN folded)")


@pytest.mark.parametrize("cnf", ["ADD", "IAND"])
@needs_spikingjelly
@pytest.mark.usefixtures("lock_step")
def test_sew_resnet18_matches_spikingjelly(sj, cnf):
    torch.manual_seed(0)
    theirs = _randomize(_sj_model(sj, "sew_resnet18", cnf=cnf, num_classes=10))
    ours = load_checkpoint(models.sew_resnet18(cnf=cnf, num_classes=10), theirs.state_dict(), layout="spikingjelly")
    _compare(ours, theirs, sj, torch.rand(2, 1, 3, 32, 32) * 2)


@needs_spikingjelly
@pytest.mark.usefixtures("lock_step")
def test_spiking_resnet18_matches_spikingjelly(sj):
    torch.manual_seed(1)
    theirs = _randomize(_sj_model(sj, "spiking_resnet18", num_classes=10))
    ours = load_checkpoint(models.spiking_resnet18(num_classes=10), theirs.state_dict())
    _compare(ours, theirs, sj, torch.rand(2, 1, 3, 32, 32) * 2)


@needs_spikingjelly
@pytest.mark.usefixtures("lock_step")
def test_convert_spikingjelly_sew_resnet(sj):
    """convert() on SpikingJelly's own SEW-ResNet-18: every conv-BN-IF chain fused (the
    downsample's conv-BN with its downsample_sn), same outputs and gradients."""
    torch.manual_seed(4)
    theirs = _randomize(_sj_model(sj, "sew_resnet18", cnf="IAND", num_classes=10))
    ours = cbp_kernels.convert(copy.deepcopy(theirs))
    fused = [m for m in ours.modules() if isinstance(m, cbp_kernels.LIFConv2d)]
    assert len(fused) == 1 + 8 * 2 + 3 and all(m.neuron is not None for m in fused)
    x = torch.rand(2, 1, 3, 32, 32) * 2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.sum().backward()
    yb.sum().backward()
    assert_close(ya, yb, 1e-4, 1e-4, "output")
    assert_close(xa.grad, xb.grad, 1e-4, 1e-3, "grad input")
    assert_close(ours.layer2[0].conv1.weight.grad, theirs.layer2[0].conv1.weight.grad, 1e-4, 1e-3, "grad conv")


@pytest.mark.parametrize("name", ["sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101", "sew_resnet152",
                                  "spiking_resnet50"])
@needs_spikingjelly
def test_every_depth_has_spikingjellys_tensors(sj, name):
    """Structure check without running: the same tensor names and shapes as SpikingJelly's."""
    with torch.device("meta"):
        ours = getattr(models, name)(num_classes=7)
        theirs = _sj_model(sj, name, num_classes=7)
    a = {k: tuple(v.shape) for k, v in to_spikingjelly(ours).items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


@needs_spikingjelly
def test_spikingjelly_round_trip(sj, tmp_path):
    torch.manual_seed(2)
    ours = _randomize(models.sew_resnet18(num_classes=5))
    save_spikingjelly(ours, tmp_path / "sj.pth")
    theirs = _sj_model(sj, "sew_resnet18", cnf="ADD", num_classes=5)
    theirs.load_state_dict(torch.load(tmp_path / "sj.pth"))  # strict
    back = load_checkpoint(models.sew_resnet18(num_classes=5), tmp_path / "sj.pth")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def _as_original(sj_state, spiking_resnet=False):
    """SpikingJelly keys -> the original repository's (written out independently of the
    interop's rules): convK/bnK -> convK.module.{0,1}, downsample -> (0.)module.{0,1}."""
    out = {}
    for k, v in sj_state.items():
        m = re.match(r"^(layer\d\.\d+\.)(conv|bn)(\d)\.(.+)$", k)
        d = re.match(r"^(layer\d\.\d+\.)downsample\.([01])\.(.+)$", k)
        if m:
            k = f"{m[1]}conv{m[3]}.module.{0 if m[2] == 'conv' else 1}.{m[4]}"
        elif d:
            k = f"{d[1]}downsample.{'' if spiking_resnet else '0.'}module.{d[2]}.{d[3]}"
        out["module." + k] = v  # saved from a DDP-wrapped model
    return out


@pytest.mark.parametrize("spiking_resnet", [False, True])
@needs_spikingjelly
def test_original_repository_checkpoint(sj, tmp_path, spiking_resnet):
    torch.manual_seed(3)
    name = "spiking_resnet18" if spiking_resnet else "sew_resnet18"
    theirs = _randomize(_sj_model(sj, name, num_classes=1000, **({} if spiking_resnet else {"cnf": "ADD"})))
    original = _as_original(theirs.state_dict(), spiking_resnet)
    assert "module.layer2.0.conv1.module.1.running_var" in original
    assert ("module.layer2.0.downsample.module.0.weight" if spiking_resnet
            else "module.layer2.0.downsample.0.module.0.weight") in original
    torch.save({"model": original, "epoch": 319, "max_test_acc1": 63.2}, tmp_path / "checkpoint_max_val_acc1.pth")
    ours = load_checkpoint(getattr(models, name)(), tmp_path / "checkpoint_max_val_acc1.pth")
    assert to_spikingjelly(ours).keys() == theirs.state_dict().keys()
    for k, v in to_spikingjelly(ours).items():
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_bad_checkpoints(tmp_path):
    model = models.sew_resnet18(num_classes=10)
    state = to_spikingjelly(model)
    bad = dict(state)
    del bad["layer1.0.bn1.running_var"]
    bad["layer1.0.extra.weight"] = torch.zeros(1)
    bad["fc.weight"] = torch.zeros(3, 512)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, bad)
    msg = str(err.value)
    for expected in ("1 unknown keys: layer1.0.extra.weight", "1 missing keys: layer1.0.conv1.bn.running_var",
                     "fc.weight: checkpoint (3, 512) vs model (10, 512)"):
        assert expected in msg, msg
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "with_args.pth")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(model, tmp_path / "with_args.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(model, {**state, "epoch": 3})
    with pytest.raises(CheckpointError, match="mapping"):
        load_checkpoint(model, [1, 2])
    with pytest.raises(ValueError, match="layout"):
        load_checkpoint(model, state, layout="keras")
    no_tracked = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_checkpoint(model, no_tracked)  # older checkpoints: tolerated


@pytest.mark.parametrize("build, shape, classes", [
    (lambda: models.sew_resnet50(cnf="IAND", num_classes=6), (2, 1, 3, 32, 32), 6),
    (lambda: models.seven_b_net(cnf="AND"), (1, 1, 2, 128, 128), 11),
    (lambda: models.wide_seven_b_net(cnf="IAND"), (1, 1, 2, 128, 128), 10),
    (lambda: models.alexnet(), (2, 1, 3, 32, 32), 10),
    (lambda: models.conv7_fc3(num_classes=100), (1, 1, 3, 32, 32), 100),
    (lambda: models.vgg16(), (1, 2, 3, 32, 32), 10),
])
def test_model_shapes_and_backward(build, shape, classes):
    torch.manual_seed(0)
    net = build()
    x = torch.rand(shape)
    y = net(x)
    assert y.shape == (shape[0], shape[1], classes)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_static_input_repeated_over_T():
    torch.manual_seed(0)
    net = models.sew_resnet18(num_classes=4, T=3).eval()
    img = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = net(img)
        net.reset()
        b = net(img.unsqueeze(0).expand(3, *img.shape))
    assert a.shape == (3, 2, 4) and torch.equal(a, b)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="depth"):
        models.SEWResNet(depth=20)
    with pytest.raises(ValueError, match="cnf"):
        models.sew_resnet18(cnf="OR")
    with pytest.raises(ValueError, match="plan token"):
        models.PlanNet("32C3 XX FC10", 2, 32)
    with pytest.raises(ValueError, match="SEW64 needs 64"):
        models.PlanNet("32C3 SEW64 FC10", 2, 32)
    with pytest.raises(ValueError, match="end with an FC"):
        models.PlanNet("32C3 MP2", 2, 32)
    with pytest.raises(ValueError, match=r"\[T, N, 3, H, W\]"):
        models.sew_resnet18()(torch.rand(3, 32, 32))


def test_memory_report_hand_counted():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3),  # 72 weights, 4 biases
                              cbp_kernels.LIFConv2d(4, 8, 3, weight_levels=(-1, 0, 1)),  # 288 weights
                              torch.nn.Flatten(), torch.nn.Linear(8, 3))  # 24 weights, 3 biases
    own = memory_report(net, print_table=False)  # only the LIFConv2d is quantized (2 bits)
    assert own.total_bits == 72 * 32 + 288 * 2 + 24 * 32
    binary = memory_report(net, (-1, 1), print_table=False)  # first and last stay FP32
    assert [l.bits_per_weight for l in binary.layers] == [32, 1, 32]
    assert binary.total_bits == 72 * 32 + 288 + 24 * 32
    with_bias = memory_report(net, (-1, 0, 1), biases=True, print_table=False)
    assert with_bias.total_bits == 72 * 32 + 288 * 2 + 24 * 32 + (4 + 3) * 32
    four = memory_report(net, 4, fp32_layers=["0"], print_table=False)
    assert four.total_bits == 72 * 32 + (288 + 24) * 2
    assert own.as_dict()["layers"][1] == dict(name="1", kind="LIFConv2d", weights=288, biases=0, bits_per_weight=2,
                                              bits=576)
    packed = torch.nn.Sequential(net[0], net[1].pack(), net[2], net[3])
    assert memory_report(packed, print_table=False).total_bits == own.total_bits
    table = str(binary)
    assert "LIFConv2d" in table and "3.36 Kb" in table


def test_memory_report_prints_table(capsys):
    memory_report(torch.nn.Linear(3, 2), (-1, 1))
    out = capsys.readouterr().out
    assert "Linear" in out and "total" in out


# The paper's weight-memory figures (Tables 1-2), three significant digits, FP32 / binary / ternary.
PAPER = [
    ("sew_resnet18", {}, {}, (374e6, 27.8e6, 39.0e6)),
    ("sew_resnet34", {}, {}, (697e6, 37.9e6, 59.2e6)),
    ("seven_b_net", {}, {}, (4.16e6, 159e3, 288e3)),
    ("wide_seven_b_net", {}, {}, (40.2e6, 1.33e6, 2.58e6)),
    ("alexnet", {}, {}, (677e6, 21.6e6, 42.7e6)),
    ("vgg16", {}, {"biases": True}, (471e6, 15.1e6, 29.8e6)),
]


@pytest.mark.parametrize("name, kw, report_kw, expected", PAPER, ids=[p[0] for p in PAPER])
def test_memory_report_reproduces_paper_tables(name, kw, report_kw, expected):
    with torch.device("meta"):
        net = getattr(models, name)(**kw)
    for levels, bits in zip((None, (-1, 1), (-1, 0, 1)), expected):
        got = memory_report(net, levels, print_table=False, **report_kw).total_bits
        assert float(f"{got:.3g}") == bits, f"{name} {levels}: {got} bits, paper {bits:g}"


def test_memory_report_errors():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        memory_report(net, (1, 1))
    with pytest.raises(ValueError, match="fp32_layers"):
        memory_report(net, (-1, 1), fp32_layers=["nope"])
    with pytest.raises(ValueError, match="no Conv / Linear"):
        memory_report(torch.nn.ReLU())
