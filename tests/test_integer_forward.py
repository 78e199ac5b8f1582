"""The exact integer forward of the quantized layers (cbp_kernels/nn/integer_forward.py).

For every conv / linear layer shape of the library models, with the input range the model
declares: the forward equals float32(integer count) * scale (+ bias) bit for bit (the count
from float64 ``F.conv2d`` on the integer levels, exact), and the backward equals the float
path's bit for bit for the same output gradient. The models' declarations are checked
against the values their layers really read; the quantizer marks the layers that read
integers, and ``CBPConfig(integer_forward=False)`` restores the float32 forward.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbp_kernels import LIFConv2d, models
from cbp_kernels.nn import QuantConv2d, QuantLinear
from cbp_kernels.nn import integer_forward, lifconv
from cbp_kernels.quant import CBPConfig, CBPQuantizer

from conftest import assert_close, kernel_backends

LEVELS = {"binary": [-1.0, 1.0], "ternary": [-1.0, 0.0, 1.0]}

# The models whose layer shapes are checked (built on the meta device: shapes only).
MODEL_BUILDERS = {
    "sew_resnet18": lambda: models.sew_resnet18(), "sew_resnet34": lambda: models.sew_resnet34(),
    "seven_b_net": lambda: models.seven_b_net(), "wide_seven_b_net": lambda: models.wide_seven_b_net(),
    "vgg16": lambda: models.vgg16(), "alexnet": lambda: models.alexnet(), "conv7_fc3": lambda: models.conv7_fc3(),
    "digits_net": lambda: models.DigitsNet(),
}


def _layer_shapes() -> list:
    """Every distinct (kind, geometry, bias, declared input_max) of the models' conv / linear
    layers, with the first model and layer that has it."""
    seen = {}
    for model_name, build in MODEL_BUILDERS.items():
        with torch.device("meta"):
            net = build()
        for name, m in net.named_modules():
            k = getattr(m, "input_max", None)
            if isinstance(m, nn.Conv2d):
                key = ("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                       m.dilation[0], m.groups, m.bias is not None, k)
            elif isinstance(m, nn.Linear):
                key = ("linear", m.in_features, m.out_features, m.bias is not None, k)
            else:
                continue
            seen.setdefault(key, f"{model_name}.{name}")
    return [pytest.param(key, id=where) for key, where in seen.items()]


LAYER_SHAPES = _layer_shapes()


def _quantized(float_layer: nn.Module, levels: str, input_max: int, backend: str = "auto"):
    cls = QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear
    q = cls.from_float(float_layer, torch.tensor(LEVELS[levels]))
    q.input_max, q.quant_backend = input_max, backend
    return q


def _reference(q, x: torch.Tensor) -> torch.Tensor:
    """float32(conv(x, levels)) * s (+ b): the count in float64 (exact), the epilogue in float32."""
    levels = (q.quantized_weight().detach() / q.weight_scale).round().double()  # Q(W) = s * q exactly
    if isinstance(q, nn.Conv2d):
        c = F.conv2d(x.double(), levels, None, q.stride, q.padding, q.dilation, q.groups)
        bias = None if q.bias is None else q.bias.detach().view(-1, 1, 1)
    else:
        c, bias = F.linear(x.double(), levels), q.bias
    out = c.float() * q.weight_scale
    return out if bias is None else out + bias.detach()


def _forward_backward(q, x: torch.Tensor, grad: torch.Tensor | None, integer: bool):
    """(y, (dx, dW, db)) of ``q`` with its integer forward on (wherever it applies) or off, for
    output gradient ``grad``."""
    q.integer_forward = "always" if integer else False
    x = x.detach().requires_grad_()
    y = q(x)
    grad = torch.randn_like(y) if grad is None else grad
    params = [x, q.weight] + ([q.bias] if q.bias is not None else [])
    return y, torch.autograd.grad(y, params, grad), grad


def _float32_bounds(q, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Per gradient (input, weight, bias) of conv layer ``q``: 2 K 2^-24 times the same
    gradient of |g|, |x| and |Q(W)| in float64 (K its number of products): what a float32
    sum of exact products may differ from the exact gradient."""
    wq = q.quantized_weight().detach().double()
    O, _, KH, KW = wq.shape
    N, _, OH, OW = g.shape
    bias = None if q.bias is None else [O]
    mags = torch.ops.aten.convolution_backward(g.double().abs(), x.double().abs(), wq.abs(), bias, q.stride, q.padding,
                                               q.dilation, False, [0, 0], q.groups, [True, True, bias is not None])
    return [None if m is None else 2 * k * 2.0 ** -24 * m
            for k, m in zip((O * KH * KW // q.groups, N * OH * OW, N * OH * OW), mags)]


def _check_layer(q, x: torch.Tensor) -> None:
    """The integer forward exact; its gradients the float path's: bit for bit for a linear layer
    (the same matrix products); for a conv on the CPU (``lifconv._tile_backward``: exact
    products on AMX-BF16, float32 sums in another order) each within twice the float32 bound
    of the other (both are within the bound of the exact gradient)."""
    y, grads, g = _forward_backward(q, x, None, integer=True)
    want = _reference(q, x)
    assert y.shape == want.shape and y.dtype == torch.float32
    diff = (y != want).sum().item()
    assert diff == 0, f"{diff} of {y.numel()} outputs differ from the exact count times the scale"
    _, float_grads, _ = _forward_backward(q, x, g, integer=False)
    if isinstance(q, nn.Conv2d) and x.device.type == "cpu":
        for name, got, exp, bound in zip(("input", "weight", "bias"), grads, float_grads, _float32_bounds(q, x, g)):
            assert got.shape == exp.shape and got.dtype == exp.dtype
            excess = (got.double() - exp.double()).abs() - 2 * bound
            assert excess.max() <= 0, f"the {name} gradient differs from the float path's by more than float32 sums may"
    else:
        for name, got, exp in zip(("input", "weight", "bias"), grads, float_grads):
            assert torch.equal(got, exp), f"the {name} gradient differs from the float path's"


@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_every_model_layer_shape_is_exact_with_the_float_backward(shape):
    """Each layer shape of the models, with the input range its model declares (1 for the
    layers reading real-valued input, whose own path is the float one, tested at 1), binary
    and ternary alternating by shape: integer forward == exact count * scale (+ bias),
    backward == the float path's (``_check_layer``)."""
    torch.manual_seed(hash(shape) % 2**31)
    k = shape[-1] or 1
    levels = "ternary" if hash(shape) % 2 else "binary"
    if shape[0] == "conv":
        _, cin, cout, ks, stride, padding, dilation, groups, bias, _ = shape
        layer = nn.Conv2d(cin, cout, ks, stride, padding, dilation, groups, bias=bias)
        side = 8 if ks > 3 else 4  # small maps; the stem's 7x7 / 2 still sees every tap
        x = torch.randint(0, k + 1, (2, cin, side, side)).float()
    else:
        _, cin, cout, bias, _ = shape
        layer = nn.Linear(cin, cout, bias=bias)
        x = torch.randint(0, k + 1, (2, 1, cin)).float()  # [T, N, features]
    if bias:
        nn.init.normal_(layer.bias)
    _check_layer(_quantized(layer, levels, k), x)


ODD_CONVS = [  # cin, cout, kernel, stride, padding, dilation, groups, bias, input_max
    (70, 41, 3, (2, 1), (1, 2), (1, 1), 1, True, 2),    # 70 channels: a partial second word; 2 bit planes
    (64, 34, 3, 1, 2, 2, 2, False, 3),                  # groups, dilation
    (33, 40, 1, 1, 0, 1, 1, True, 7),                   # 1x1, three bit planes
    (5, 6, 3, 1, 1, 1, 1, False, 255),                  # eight planes: every uint8 bit
]


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("conv", ODD_CONVS, ids=lambda c: "x".join(map(str, c[:3])) + f"-k{c[-1]}")
def test_odd_geometries_and_input_ranges(conv, levels):
    """Stride / padding / dilation / groups / bias and inputs 0..k up to 255 (each bit plane
    carries its power of two): exact, and the backward is the float path's (``_check_layer``)."""
    torch.manual_seed(len(ODD_CONVS) + conv[0])
    cin, cout, ks, stride, padding, dilation, groups, bias, k = conv
    layer = nn.Conv2d(cin, cout, ks, stride, padding, dilation, groups, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randint(0, k + 1, (3, cin, 7, 6)).float()
    x[0, :, 0, 0] = k  # the top value is present
    _check_layer(_quantized(layer, levels, k), x)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("cpu", "bitconv2d", "cbp_kernels.ops.bitconv"))
def test_every_backend_of_the_packed_conv(backend):
    """The layers' backend (``quant_backend``, the quantizer's ``backend=``) runs the packed
    convolution and the packing: each gives the exact result."""
    torch.manual_seed(3)
    layer = nn.Conv2d(36, 8, 3, 2, 1, bias=True)
    nn.init.normal_(layer.bias)
    x = torch.randint(0, 3, (2, 36, 4, 3)).float()
    _check_layer(_quantized(layer, "ternary", 2, backend), x)
    lin = _quantized(nn.Linear(45, 7, bias=False), "binary", 1, backend)
    _check_layer(lin, torch.randint(0, 2, (3, 45)).float())


def test_lifconv_runs_the_integer_forward_in_training():
    """``LIFConv2d(weight_levels=..., input_max=k)``: its convolution (no BN, no neuron: the
    output is the conv's) is exact, and its training path with BN and the neuron goes
    through it too (its gradients are the float path's for the same spikes' gradient)."""
    torch.manual_seed(5)
    m = LIFConv2d(40, 24, 3, padding=1, bias=True, bn=False, neuron=None, weight_levels="ternary", input_max=3)
    m.integer_forward = "always"
    nn.init.normal_(m.bias)
    x = torch.randint(0, 4, (2, 3, 40, 6, 6)).float()
    y = m(x)
    levels = (m.quantized_weight().detach() / m.quant_scale()).round().double()
    c = F.conv2d(x.flatten(0, 1).double(), levels, None, 1, 1).float()
    assert torch.equal(y.flatten(0, 1), c * m.quant_scale() + m.bias.detach().view(-1, 1, 1))

    fixed = LIFConv2d(40, 8, 1, bn=False, neuron=None, weight_levels="binary", weight_scale=0.3, input_max=3)
    fixed.integer_forward = "always"
    levels = (fixed.quantized_weight().detach() / 0.3).round().double()
    want = F.conv2d(x.flatten(0, 1).double(), levels).float() * torch.tensor(0.3)  # a float scale, as float32
    assert torch.equal(fixed(x).flatten(0, 1), want)

    layer = LIFConv2d(40, 24, 3, padding=1, weight_levels="binary", input_max=3, neuron="if",
                      surrogate_function="atan")
    layer.integer_forward = "always"  # 40 * 9 / 2 planes: below MIN_PRODUCTS_PER_PLANE
    calls = []
    real = integer_forward.integer_conv2d
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cbp_kernels.nn.lifconv.integer_conv2d", lambda *a: calls.append(a[-1]) or real(*a))
        layer(x).sum().backward()
        assert [s.input_max for s in calls] == [3]
        layer.integer_forward = False
        layer.reset()
        layer(x)
        assert len(calls) == 1, "integer_forward=False must keep the float forward"


def test_lifconv_on_the_float_forward_takes_the_level_backward(monkeypatch):
    """A binary LIFConv2d whose integer forward the shape rule declines (a 1x1 downsample):
    its input gradient still runs on the levels q with alpha = s (exact in bfloat16: the tile
    path; q = sign(Q(W)) read by the op, ``weight_sign``), and its gradients are the ATen backward's (``integer_forward=False``) to float32
    accuracy."""
    torch.manual_seed(8)
    x = torch.randint(0, 2, (2, 3, 24, 9, 9)).float()
    grads, seen = {}, []
    real = lifconv.conv_input_grad
    monkeypatch.setattr(lifconv, "conv_input_grad",
                        lambda g, w, *a, **kw: seen.append((w.sign(), a[-1], kw)) or real(g, w, *a, **kw))
    for mode in (True, False):
        torch.manual_seed(9)
        m = LIFConv2d(24, 16, 1, stride=2, bn=False, neuron=None, weight_levels="binary", input_max=1)
        m.integer_forward = mode
        assert not integer_forward.takes_integer_forward(m)
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        grads[mode] = (xi.grad, m.weight.grad)
    assert len(seen) == 1 and set(seen[0][0].unique().tolist()) == {-1.0, 1.0} and seen[0][2] == {"weight_sign": True}
    assert seen[0][1] == pytest.approx(float(m.quant_scale()))
    for got, exp in zip(grads[True], grads[False]):
        assert_close(got, exp, 1e-6, 1e-5, "gradient")


def _input_ranges(net: nn.Module, x: torch.Tensor) -> dict[str, tuple[bool, float]]:
    """What each conv / linear layer of ``net`` reads on ``x``: (all integers >= 0, max)."""
    seen = {}

    def hook(name):
        def record(_, args):
            v = args[0].detach()
            seen[name] = (bool(((v == v.round()) & (v >= 0)).all()), float(v.max()))
        return record

    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_pre_hook(hook(name))
    net.train()
    with torch.no_grad():
        net(x)
    return seen


def _loud(net: nn.Module) -> nn.Module:
    """``net`` with its weights x4, so that its LIF layers (no BN) fire on random input."""
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)
    return net


@pytest.mark.parametrize("build, shape", [
    (lambda: models.sew_resnet34(num_classes=5, v_threshold=1e-3), (1, 2, 3, 64, 64)),
    (lambda: models.spiking_resnet18(num_classes=5, v_threshold=1e-3), (1, 2, 3, 64, 64)),
    (lambda: models.seven_b_net(input_size=128, v_threshold=1e-3), (1, 2, 2, 128, 128)),
    (lambda: models.vgg16(input_size=32, v_threshold=1e-3), (1, 2, 3, 32, 32)),
    (lambda: _loud(models.DigitsNet()), (4, 8, 1, 8, 8)),
], ids=["sew_resnet34", "spiking_resnet18", "seven_b_net", "vgg16", "digits_net"])
def test_models_declare_what_their_layers_read(build, shape):
    """Each layer's ``input_max`` is what it reads: a layer declaring k reads integers in
    [0, k], reaching k (a low threshold makes most neurons fire, so SEW sums reach their
    bound); a layer declaring None reads a non-integer value (images, mean-pooled spikes)."""
    torch.manual_seed(0)
    net = build()
    seen = _input_ranges(net, 8 * torch.rand(shape))  # strong input: the spikes reach every layer
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        integral, top = seen[name]
        if m.input_max is None:
            assert not integral, f"{name} declares a real-valued input but reads integers up to {top}"
        else:
            assert integral and top == m.input_max, f"{name} declares 0..{m.input_max}, reads up to {top}"


def test_quantizer_marks_the_integer_input_layers_and_the_switch_restores_the_float_forward():
    """The quantizer runs the integer forward on the layers whose model declares an integer
    input (not SEW-ResNet's stem, which reads the images, nor the fc, which reads mean rates):
    by default where it is the faster forward (every 3x3 conv, not the 1x1 downsamples),
    ``"always"`` on all of them; ``CBPConfig(integer_forward=False)`` keeps every layer on
    F.conv2d(x, Q(W)) bit for bit."""
    torch.manual_seed(1)
    net = models.sew_resnet18(num_classes=4)
    q = CBPQuantizer(net, "ternary", exclude=[])
    downsamples = {f"layer{i}.0.downsample" for i in (2, 3, 4)}
    assert set(q.layers) - set(q.integer_layers) == {"conv1", "fc"} | downsamples
    every = CBPQuantizer(models.sew_resnet18(num_classes=4), "ternary", exclude=[],
                         config=dataclasses.replace(CBPConfig(), integer_forward="always"))
    assert set(every.layers) - set(every.integer_layers) == {"conv1", "fc"}
    assert "layer4.0.downsample" in every.integer_layers and net.layer4[0].downsample.input_max == 3

    digits = models.DigitsNet()
    conv2 = digits.conv2
    cfg = dataclasses.replace(CBPConfig(), integer_forward=False)
    qf = CBPQuantizer(digits, "binary", config=cfg)
    assert qf.integer_layers == [] and list(qf.layers) == ["conv2", "fc1"]
    layer = digits.conv2
    x = torch.randint(0, 2, (4, 16, 8, 8)).float()
    assert torch.equal(layer(x), F.conv2d(x, layer.quantized_weight(), None, 2, 1))
    assert conv2.weight is layer.weight
    always = dataclasses.replace(CBPConfig(), integer_forward="always")
    assert CBPQuantizer(models.DigitsNet(), "binary", config=always).integer_layers == ["conv2", "fc1"]
    # by default neither: 16 channels x 3x3 per output, and a linear layer
    assert CBPQuantizer(models.DigitsNet(), "binary").integer_layers == []
    with pytest.raises(ValueError, match="integer_forward must be True"):
        dataclasses.replace(CBPConfig(), integer_forward="yes")


@pytest.mark.parametrize("kernel, channels, input_max, integer", [
    (3, 64, 1, True), (3, 64, 3, True), (3, 63, 3, False), (3, 32, 1, True), (3, 16, 1, False),
    (1, 288, 1, True), (1, 287, 1, False), (1, 256, 3, False), (1, 576, 3, True), (3, 64, 7, False)])
def test_the_integer_forward_runs_where_it_is_faster(kernel, channels, input_max, integer):
    """``integer_forward=True`` decides from the weight's shape and the declared range alone
    (``MIN_PRODUCTS_PER_PLANE`` products per output and input bit plane, no device sync):
    SEW-ResNet-18's 3x3 layers take it, its 1x1 downsamples (3 planes) do not; linear layers
    keep the float forward; ``"always"`` takes it everywhere it applies."""
    layer = _quantized(nn.Conv2d(channels, 8, kernel, padding=kernel // 2), "binary", input_max)
    assert integer_forward.prefers_integer(tuple(layer.weight.shape), input_max) is integer
    x = torch.randint(0, input_max + 1, (2, channels, 5, 5)).float()
    assert (integer_forward.integer_spec(layer, x, layer.weight, layer.weight_scale, 4) is not None) is integer
    layer.integer_forward = "always"
    assert integer_forward.integer_spec(layer, x, layer.weight, layer.weight_scale, 4) is not None
    linear = _quantized(nn.Linear(4096, 8), "binary", 1)
    assert not integer_forward.prefers_integer(tuple(linear.weight.shape), 1)


def test_float_path_where_the_integer_one_does_not_apply():
    """Autocast, torch.compile, float64, undeclared input and level sets the popcount conv
    does not run keep the float forward."""
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randint(0, 2, (2, 8, 5, 5)).float()
    q = _quantized(conv, "binary", 1)
    with torch.autocast("cpu", torch.bfloat16):
        assert q(x).dtype == torch.bfloat16
    assert integer_forward.integer_spec(q, x.double(), q.weight.double(), q.weight_scale, 4) is None
    q.input_max = None
    assert integer_forward.integer_spec(q, x, q.weight, q.weight_scale, 4) is None
    q.input_max = 1
    traced = torch.compile(q, fullgraph=True, backend="eager")  # dynamo traces the float forward
    assert torch.equal(traced(x), F.conv2d(x, q.quantized_weight(), q.bias, 1, 1))
    wide = QuantConv2d.from_float(nn.Conv2d(8, 4, 3), torch.tensor([-2.0, -1.0, 0.0, 1.0]))
    wide.input_max = 1
    assert wide.popcount_levels is None and integer_forward.integer_spec(wide, x, wide.weight, 1.0, 4) is None


def test_bad_input_max_is_refused_before_anything_changes():
    net = models.DigitsNet()
    net.conv2.input_max = 0
    with pytest.raises(ValueError, match="'conv2': input_max must be None"):
        CBPQuantizer(net, "binary")
    assert type(net.conv2) is nn.Conv2d
    with pytest.raises(ValueError, match="input_max must be None"):
        LIFConv2d(4, 4, 3, input_max=1.5)
