"""LIFConv2d against SpikingJelly's Conv2d -> BatchNorm2d -> neuron composition (outputs,
every gradient, BN running statistics, the folded eval path), the compact (bit-packed)
saving of spikes and the memory it saves, quantized weights, convert() and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bench.harness import peak_memory
from cbp_kernels import LIFConv2d, convert
from cbp_kernels.nn import IF, LIF, PLIF
from cbp_kernels.nn import lifconv
from cbp_kernels.nn.lifconv import SpikeConv2dFunction, compact_saved_tensors

from conftest import GRAD_TOL, assert_close, kernel_backends, needs_spikingjelly

def _sj():
    """SpikingJelly 2.0's (functional, layer, neuron, surrogate): the oracle of the tests marked
    ``needs_spikingjelly``, imported by them only (collection does not need it)."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    return functional, layer, neuron, surrogate


def _sj_composition(ours: LIFConv2d, v_reset, detach_reset):
    """The SpikingJelly modules LIFConv2d replaces, with ours' weights."""
    _, layer, neuron, surrogate = _sj()
    conv = layer.Conv2d(ours.in_channels, ours.out_channels, ours.kernel_size, ours.stride, ours.padding,
                        ours.dilation, ours.groups, bias=ours.bias is not None, step_mode="m")
    conv.load_state_dict({k: v for k, v in ours.state_dict().items() if k in ("weight", "bias")})
    bn = layer.BatchNorm2d(ours.out_channels, step_mode="m")
    bn.load_state_dict(ours.bn.state_dict())
    # SpikingJelly's default surrogate (Sigmoid, alpha 4) against ours: the defaults must agree
    kw = dict(v_reset=v_reset, detach_reset=detach_reset, step_mode="m")
    if ours.neuron_type == "lif":
        kw["tau"] = 2.0
    sn = {"if": neuron.IFNode, "lif": neuron.LIFNode, "plif": neuron.ParametricLIFNode}[ours.neuron_type](**kw)
    return torch.nn.Sequential(conv, bn, sn)


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)


CASES = [
    dict(neuron="if", v_reset=0.0, detach_reset=True, stride=1, padding=1, groups=1, bias=False),
    dict(neuron="lif", v_reset=None, detach_reset=False, stride=2, padding=0, groups=1, bias=True),
    dict(neuron="plif", v_reset=-0.3, detach_reset=True, stride=1, padding=2, groups=2, bias=False),
    dict(neuron="lif", v_reset=0.0, detach_reset=False, stride=(2, 1), padding=(1, 0), groups=1, bias=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['neuron']}-vr{c['v_reset']}-s{c['stride']}-g{c['groups']}")
@pytest.mark.parametrize("spiking_input", [True, False])
@needs_spikingjelly
def test_matches_spikingjelly_training_and_eval(case, spiking_input):
    functional = _sj()[0]
    case = dict(case)
    v_reset, detach_reset = case.pop("v_reset"), case.pop("detach_reset")
    ours = LIFConv2d(4, 6, 3, v_reset=v_reset, detach_reset=detach_reset, **case)
    _randomize_bn(ours.bn)
    sj = _sj_composition(ours, v_reset, detach_reset)
    x = torch.rand(3, 2, 4, 11, 9) * 2
    x = (x > 1).float() if spiking_input else x  # spikes, or analogue input (the first layer)
    for step in range(2):  # two training steps: state reset, running stats accumulate
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), sj(xb)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert_close(ya, yb, 0, 0, f"spikes step {step}")
        assert_close(xa.grad, xb.grad, 1e-5, 1e-4, "grad x")
        ours.reset()
        functional.reset_net(sj)
    assert_close(ours.weight.grad, sj[0].weight.grad, 1e-4, 1e-4, "grad weight")
    assert_close(ours.bn.weight.grad, sj[1].weight.grad, 1e-4, 1e-4, "grad bn.weight")
    assert_close(ours.bn.bias.grad, sj[1].bias.grad, 1e-4, 1e-4, "grad bn.bias")
    if case["bias"]:
        assert_close(ours.bias.grad, sj[0].bias.grad, 1e-4, 1e-4, "grad bias")
    if case["neuron"] == "plif":
        assert_close(ours.neuron.w.grad, sj[2].w.grad, 1e-4, 1e-4, "grad plif w")
    assert_close(ours.bn.running_mean, sj[1].running_mean, 1e-6, 1e-6, "running_mean")
    assert_close(ours.bn.running_var, sj[1].running_var, 1e-6, 1e-6, "running_var")
    assert int(ours.bn.num_batches_tracked) == int(sj[1].num_batches_tracked) == 2
    ours.eval()
    sj.eval()
    with torch.no_grad():  # eval: BN folded into the conv; spikes agree up to threshold ties
        ya, yb = ours(x), sj(x)
    mismatch = (ya != yb).float().mean().item()
    assert mismatch <= 1e-3, f"eval spikes differ at {mismatch:.2%} of positions"


def test_folded_eval_matches_unfolded():
    ours = LIFConv2d(5, 7, 3, padding=1, bias=True, neuron=None)
    _randomize_bn(ours.bn)
    ours.eval()
    x = torch.randn(2, 3, 5, 8, 8)
    w, b = ours.folded_weight_bias()
    folded = F.conv2d(x.flatten(0, 1), w, b, padding=1)
    unfolded = ours.bn(F.conv2d(x.flatten(0, 1), ours.weight, ours.bias, padding=1))
    assert_close(folded, unfolded, 1e-5, 1e-5, "folded conv")
    assert_close(ours(x).flatten(0, 1), unfolded, 1e-5, 1e-5, "eval forward")


def _saved_bytes(fn):
    """Bytes of every tensor autograd saves while ``fn`` runs (a deterministic count)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(total), out


@pytest.mark.parametrize("kind", ["spikes", "counts", "analogue"])
def test_spike_conv_saves_compact_input_and_matches_conv2d(kind):
    x = torch.rand(6, 5, 13, 11)
    x = {"spikes": (x > 0.6).float(), "counts": (x * 4).floor(), "analogue": x - 0.5}[kind]
    w = torch.randn(8, 5, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    nbytes, ya = _saved_bytes(lambda: SpikeConv2dFunction.apply(xa, w, b, (2, 1), (1, 1), (1, 1), 1))
    expect_x = {"spikes": 4 * ((x.numel() + 31) // 32), "counts": x.numel(), "analogue": 4 * x.numel()}[kind]
    assert nbytes == expect_x + w.numel() * 4, f"saved {nbytes} bytes"
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    yb = F.conv2d(xb, w, b, (2, 1), (1, 1))
    (yb * g).sum().backward()
    assert_close(ya, yb, 1e-5, 1e-5, "output")
    assert_close(xa.grad, xb.grad, 1e-5, 1e-4, "grad x")
    assert_close(gw, w.grad, 1e-4, 1e-4, "grad w")
    assert_close(gb, b.grad, 1e-4, 1e-4, "grad b")


@pytest.mark.parametrize("stride,spiking_input,tile_forward", [(1, True, True), (2, True, False), (1, False, False)])
def test_float_layer_on_spikes_runs_the_tile_ops(monkeypatch, stride, spiking_input, tile_forward):
    """A float (not quantized) LIFConv2d on spikes, on the CPU in float32: the forward through
    ``conv2d_integer_input`` at stride 1 only, the input gradient through ``conv_input_grad``
    with the float weight itself (enough pixels: ``TILE_INPUT_GRAD_MIN_PIXELS``); analogue input
    (images) keeps ATen's path. Outputs and gradients are the ATen path's (``integer_forward =
    False``, which calls neither) to float32 accuracy."""
    torch.manual_seed(11)
    x = torch.rand(2, 4, 24, 12, 12)  # 288 output pixels at stride 2
    x = (x > 0.7).float() if spiking_input else x
    calls = {"forward": [], "input_grad": []}
    for key, name in (("forward", "conv2d_integer_input"), ("input_grad", "conv_input_grad")):
        real = getattr(lifconv, name)
        monkeypatch.setattr(lifconv, name, lambda *a, real=real, key=key: calls[key].append(a[1]) or real(*a))
    results = {}
    for mode in (True, False):
        torch.manual_seed(12)
        m = LIFConv2d(24, 16, 3, stride=stride, padding=1, bn=False, neuron=None)
        m.integer_forward = mode
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        results[mode] = (y, xi.grad, m.weight.grad)
        if mode:
            assert len(calls["forward"]) == int(tile_forward)
            assert len(calls["input_grad"]) == int(spiking_input)
            assert all(w is m.weight for w in calls["forward"] + calls["input_grad"])
    assert len(calls["forward"]) == int(tile_forward) and len(calls["input_grad"]) == int(spiking_input), \
        "integer_forward=False must keep ATen's forward and backward"
    for name, got, exp in zip(("output", "grad x", "grad w"), results[True], results[False]):
        assert_close(got, exp, 1e-5, 1e-5, name)


def test_compact_saved_tensors_restores_exactly():
    x = (torch.rand(4, 300) > 0.5).float().requires_grad_()
    y = torch.rand(4, 300).round().requires_grad_()
    with compact_saved_tensors():
        z = x * y  # saves both operands, both {0, 1}
    z.sum().backward()
    assert torch.equal(x.grad, y.detach()) and torch.equal(y.grad, x.detach())


LAYERS = 6


def _stack(in_channels: int, **layer_kw) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[LIFConv2d(in_channels if i == 0 else 16, 16, 3, padding=1, **layer_kw)
                                 for i in range(LAYERS)])


def _peak_and_weight_grads(net: torch.nn.Sequential, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Peak memory of one training step (forward + backward, CPU allocator events) and the grads."""

    def step():
        net(x).sum().backward()
        for m in net:
            m.reset()

    return peak_memory(step), [m.weight.grad.clone() for m in net]


def test_compact_spikes_lower_training_peak_memory(monkeypatch):
    # ATen's float32 backward on both sides (compact saving alone routes the weight gradient to
    # AMX-BF16, whose float32 sums run in another order): the check is that nothing is lost
    monkeypatch.setenv("CBP_KERNELS_NO_AMX", "1")
    x = torch.rand(4, 2, 3, 24, 24)
    peaks, grads = {}, {}
    for compact in (False, True):
        peaks[compact], grads[compact] = _peak_and_weight_grads(_stack(3, neuron="if", compact_spikes=compact), x)
    spike_bytes = 4 * 2 * 16 * 24 * 24 * 4  # one layer's float32 spike tensor
    # The peak is at the end of the forward. Without packing, the spikes of every layer but the
    # last are held for the backward in float32; with it, in 1 bit, except the last layer's
    # input, still referenced while that layer runs: LAYERS - 2 float tensors fewer, less the
    # packing's 1-byte-per-spike temporary.
    saved = peaks[False] - peaks[True]
    assert saved >= (LAYERS - 2 - 0.5) * spike_bytes, f"peak {peaks[True]} vs {peaks[False]} bytes"
    for a, b in zip(grads[True], grads[False]):
        assert_close(a, b, 1e-5, 1e-5, "weight grad with compact saving")


BN_VARIANTS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("cpu"))
@pytest.mark.parametrize("neuron_type", ["if", "lif", "plif"])
@pytest.mark.parametrize("bn_kw", BN_VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("loss_of", ["spikes_and_v", "spikes"])
def test_recompute_bn_matches_unfused(backend, neuron_type, bn_kw, loss_of):
    """BatchNormNeuronFunction (saves only the conv output) against conv - BN - neuron run as
    separate autograd nodes: spikes, every gradient, BN's running statistics and step count, the
    neuron state; two calls without a reset, so the second starts from the first's V[T-1]; the
    loss with or without the last state V[T-1] (unused: no gradient tensor for it)."""
    layers = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        m = LIFConv2d(4, 6, 3, padding=1, neuron=neuron_type, v_reset=-0.2, recompute_bn=recompute, backend=backend)
        m.bn = torch.nn.BatchNorm2d(6, **bn_kw)
        if m.bn.weight is not None:
            _randomize_bn(m.bn)
        layers[recompute] = m
    x = torch.rand(3, 2, 4, 7, 5) * 2
    out = {}
    for recompute, m in layers.items():
        xs = [x.clone().requires_grad_(), (x.flip(-1) > 1).float().requires_grad_()]
        ys = [m(xi) for xi in xs]  # the second call continues from the first's state
        g = torch.randn_like(ys[0], generator=torch.Generator().manual_seed(1))
        loss = sum((y * g).sum() for y in ys)
        (loss + m.neuron.v.square().sum() if loss_of == "spikes_and_v" else loss).backward()
        out[recompute] = (ys, [xi.grad for xi in xs], m.neuron.v.detach(),
                          {n: p.grad for n, p in m.named_parameters()}, {n: b.clone() for n, b in m.bn.named_buffers()})
    (ya, gxa, va, gpa, bufa), (yb, gxb, vb, gpb, bufb) = out[False], out[True]
    for i in range(2):
        assert torch.equal(ya[i], yb[i]), f"call {i}: spikes differ"
        assert_close(gxb[i], gxa[i], 1e-5, 1e-4, f"call {i}: grad x")
    assert_close(vb, va, 1e-6, 1e-6, "neuron state")
    assert gpa.keys() == gpb.keys()
    for name in gpa:
        assert_close(gpb[name], gpa[name], 1e-5, 1e-4, f"grad {name}")
    assert bufa.keys() == bufb.keys()
    for name in bufa:
        assert torch.equal(bufb[name], bufa[name]), f"bn buffer {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("affine", ["gamma_beta", "gamma", "none"])
def test_batch_norm_output_is_bitwise_the_training_op(dtype, layout, affine):
    """The backward's y = BN(z), rebuilt from the forward's batch statistics in one pass
    (``batch_norm_output``), is bit for bit ``aten.native_batch_norm``'s training output, so the
    neuron's backward sees the forward's y and spikes: channel counts below and above a vector
    of float32, images of one pixel and odd sizes, large offsets (rounding in every term)."""
    from cbp_kernels.nn.bn_neuron import batch_norm_output

    gen = torch.Generator().manual_seed(0)
    for channels, h, w in [(3, 5, 7), (17, 9, 9), (64, 20, 12), (40, 1, 1)]:
        z = (torch.randn(4, channels, h, w + 2, generator=gen) * 5 + 3).to(dtype)
        z = {"contiguous": z[..., 1:-1].contiguous(), "channels_last": z[..., 1:-1].contiguous(
            memory_format=torch.channels_last), "strided": z[..., 1:-1]}[layout]
        gamma = torch.randn(channels, generator=gen) if affine != "none" else None
        beta = torch.randn(channels, generator=gen) if affine == "gamma_beta" else None
        y, mean, invstd = torch.ops.aten.native_batch_norm(z, gamma, beta, None, None, True, 0.1, 1e-5)
        again = batch_norm_output(z, gamma, beta, mean, invstd, 1e-5)
        assert again.dtype == y.dtype and again.shape == y.shape
        differ = int((again != y).sum())
        assert differ == 0, f"{differ} of {y.numel()} values differ ({channels} channels, {h}x{w})"


def test_recompute_bn_lowers_training_peak_memory():
    """One float activation per layer fewer is kept for the backward (CPU allocator events)."""
    x = (torch.rand(4, 2, 16, 24, 24) > 0.5).float()
    peaks, grads = {}, {}
    for recompute in (False, True):
        peaks[recompute], grads[recompute] = _peak_and_weight_grads(_stack(16, neuron="lif", recompute_bn=recompute), x)
    act_bytes = 4 * 2 * 16 * 24 * 24 * 4  # one layer's float32 activation
    saved = peaks[False] - peaks[True]
    assert saved >= (LAYERS - 1) * act_bytes, f"peak {peaks[True]} vs {peaks[False]} bytes"
    for a, b in zip(grads[True], grads[False]):
        assert_close(a, b, 1e-5, 1e-5, "weight grad with recompute_bn")


def test_declared_input_saved_once_without_a_value_check():
    """Layers reading the same input declared as integers (``input_max``: a SEW block's conv1
    and downsample on an ADD sum) save ONE compact copy of it (8 bits for sums, 1 bit for
    spikes), made without a value check, with the same gradients as the checked copy."""
    for input_max, values in [(2, 3), (1, 2)]:
        torch.manual_seed(0)
        x = torch.randint(0, values, (3, 2, 8, 6, 6)).float()
        grads, saved = {}, {}
        for declared in (None, input_max):
            torch.manual_seed(1)
            convs = [LIFConv2d(8, 16, k, stride=2, padding=k // 2, neuron="if", input_max=declared) for k in (3, 1)]
            ys = [m(x) for m in convs]
            conv_nodes = [y.grad_fn.next_functions[0][0] for y in ys]  # BN-neuron <- conv
            saved[declared] = [node.saved_tensors[0] for node in conv_nodes]
            sum((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum() for y in ys).backward()
            grads[declared] = [m.weight.grad for m in convs]
        copies = saved[input_max]
        assert copies[0].dtype == (torch.uint8 if input_max > 1 else torch.int32)
        assert copies[0].data_ptr() == copies[1].data_ptr(), "each layer made its own copy of the input"
        for a, b in zip(grads[input_max], grads[None]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_input_and_low_precision(dtype):
    torch.manual_seed(0)
    m = LIFConv2d(4, 6, 3, padding=1, neuron="plif").to(dtype)
    x = (torch.rand(3, 2, 9, 7, 4) > 0.5).to(dtype).permute(0, 1, 4, 2, 3)  # [T, N, C, H, W] strided
    outs = []
    for inp in (x, x.contiguous()):
        inp = inp.clone().requires_grad_() if inp.is_contiguous() else inp.requires_grad_()
        y = m(inp)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)).sum().backward()
        outs.append((y, m.weight.grad.clone(), m.neuron.w.grad.clone()))
        m.weight.grad = m.neuron.w.grad = None
        m.reset()
    assert outs[0][0].dtype == dtype
    assert torch.equal(outs[0][0], outs[1][0])
    atol, rtol = GRAD_TOL[dtype]
    assert_close(outs[0][1], outs[1][1], 10 * atol, rtol, "grad weight")  # sums of up to 162 terms
    assert_close(outs[0][2], outs[1][2], 10 * atol, rtol, "grad plif w")


def test_stateful_between_calls_and_reset():
    torch.manual_seed(0)
    m = LIFConv2d(2, 3, 1, bn=False, neuron="lif")
    x = torch.rand(2, 1, 2, 4, 4) * 2
    with torch.no_grad():
        whole = m(torch.cat([x, x]))
        m.reset()
        first, second = m(x), m(x)
    assert torch.equal(torch.cat([first, second]), whole), "v must carry over between calls"
    m.reset()
    assert m.neuron.v is None


@pytest.mark.parametrize("levels", [(-1.0, 1.0), (-1.0, 0.0, 1.0)])
def test_weight_levels_quantize_with_straight_through_gradient(levels):
    from cbp_kernels.ops import quantize

    torch.manual_seed(0)
    m = LIFConv2d(3, 4, 3, padding=1, bn=False, neuron=None, weight_levels=levels)
    x = torch.randn(2, 2, 3, 6, 6)
    scale = m.weight.detach().abs().mean()
    wq = quantize(m.weight.detach(), torch.tensor(levels), scale, backend="reference")
    assert set((wq / scale).round().unique().tolist()) <= set(levels)
    y = m(x)
    assert_close(y.flatten(0, 1), F.conv2d(x.flatten(0, 1), wq, padding=1), 1e-5, 1e-5, "quantized conv")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w = m.weight.detach().clone().requires_grad_()
    (F.conv2d(x.flatten(0, 1), w, padding=1) * g.flatten(0, 1)).sum().backward()
    assert_close(m.weight.grad, w.grad, 1e-4, 1e-4, "straight-through grad")


@pytest.mark.parametrize("levels", [(-1, 1), (-1, 0, 1)])
@pytest.mark.parametrize("neuron", [None, "lif"])
def test_pack_matches_eval_forward(levels, neuron):
    torch.manual_seed(0)
    m = LIFConv2d(16, 8, 3, stride=2, padding=1, bias=True, neuron=neuron, weight_levels=levels)
    _randomize_bn(m.bn)
    m.eval()
    packed = m.pack()
    assert packed.conv.levels == ("binary" if len(levels) == 2 else "ternary")
    x = (torch.rand(3, 2, 16, 9, 11) > 0.6).float()
    with torch.no_grad():
        want, got = m(x), packed(x)
    assert_close(got, want, 1e-5, 1e-5, "packed layer")
    with pytest.raises(ValueError, match="weight_levels"):
        LIFConv2d(2, 2, 3).pack()


@pytest.mark.parametrize("neuron_type,kw", [("if", {}), ("lif", {"tau": 1.7, "decay_input": False}),
                                           ("lif", {"v_reset": None}), ("plif", {"v_reset": -0.25})])
def test_packed_layer_is_the_fused_op_equal_to_the_unfused_chain(neuron_type, kw, monkeypatch):
    """``pack()`` runs ONE ``packed_conv2d_lif`` (no float popcount conv: ``packed_conv2d`` is never
    called), whose spikes are bit for bit the unfused chain's: ``PackedConv2d`` -> per-channel
    affine -> the neuron module (a power-of-two weight scale, so c * scale * gain rounds the same
    both ways)."""
    import cbp_kernels.nn.bitconv as packed_module

    torch.manual_seed(0)
    m = LIFConv2d(16, 40, 3, padding=1, bias=True, neuron=neuron_type, weight_levels=(-1, 0, 1), weight_scale=0.5,
                  **kw)
    _randomize_bn(m.bn)
    with torch.no_grad():
        m.weight.uniform_(-1, 1)  # on -0.5, 0 and 0.5 once quantized
        if neuron_type == "plif":
            m.neuron.w.fill_(0.3)  # tau = 1 / sigmoid(0.3), not a round number
    packed = m.eval().pack()
    x = (torch.rand(4, 2, 16, 7, 9) > 0.6).float()
    with torch.no_grad():
        chain_neuron = copy.deepcopy(m.neuron)
        chain_neuron.reset()
        want = chain_neuron(packed.conv(x) * packed.gain.view(-1, 1, 1) + packed.shift.view(-1, 1, 1))

        def no_float_conv(*args, **kwargs):
            raise AssertionError("the packed LIF layer ran the unfused popcount conv")

        monkeypatch.setattr(packed_module, "packed_conv2d", no_float_conv)
        got = packed(x)
    assert 0 < want.mean() < 1, "the case must fire some neurons and not all"
    assert got.shape == want.shape and torch.equal(got, want)


@needs_spikingjelly
def test_convert_replaces_spikingjelly_layers():
    functional, layer, neuron, surrogate = _sj()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(
                layer.Conv2d(3, 8, 3, padding=1, bias=False, step_mode="m"), layer.BatchNorm2d(8, step_mode="m"),
                neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
                layer.Conv2d(8, 8, 3, padding=1, bias=False, step_mode="m"), layer.BatchNorm2d(8, step_mode="m"),
                neuron.ParametricLIFNode(init_tau=3.0, surrogate_function=surrogate.ATan(), detach_reset=True,
                                         step_mode="m"))
            # conv -> bn whose output is added to the input before the neuron: not a chain
            self.conv = layer.Conv2d(8, 8, 1, bias=False, step_mode="m")
            self.bn = layer.BatchNorm2d(8, step_mode="m")
            self.sn = neuron.IFNode(surrogate_function=surrogate.ATan(), v_reset=None, step_mode="m")
            self.fc = layer.Linear(8 * 5 * 5, 4, step_mode="m")

        def forward(self, x):
            x = self.features(x)
            x = self.sn(self.bn(self.conv(x)) + x)
            return self.fc(x.flatten(2))

    sj = Net()
    for m in sj.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            _randomize_bn(m)
    with torch.no_grad():
        sj.features[5].w.fill_(-0.4)  # a learned PLIF time constant
    ours = convert(copy.deepcopy(sj))
    kinds = [type(m).__name__ for m in ours.features]
    assert kinds == ["LIFConv2d", "Identity", "Identity", "LIFConv2d", "Identity", "Identity"]
    assert isinstance(ours.conv, LIFConv2d) and ours.conv.neuron is None, "conv+bn fused without the neuron"
    assert isinstance(ours.sn, IF) and ours.sn.v_reset is None
    assert isinstance(ours.features[0].neuron, LIF) and isinstance(ours.features[3].neuron, PLIF)
    assert ours.features[3].neuron.w.item() == pytest.approx(-0.4)
    x = (torch.rand(2, 2, 3, 5, 5) * 2)
    for mode in ("train", "eval"):
        getattr(sj, mode)()
        getattr(ours, mode)()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), sj(xb)
        assert_close(ya, yb, 1e-5, 1e-5, f"{mode} output")
        if mode == "train":
            ya.sum().backward()
            yb.sum().backward()
            assert_close(xa.grad, xb.grad, 1e-5, 1e-4, "grad x")
            assert_close(ours.features[3].neuron.w.grad, sj.features[5].w.grad, 1e-4, 1e-4, "grad plif w")
        functional.reset_net(ours)
        functional.reset_net(sj)


@needs_spikingjelly
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_defaults_are_spikingjellys(kind, step_mode):
    """``IF() / LIF() / PLIF()`` and ``LIFConv2d``'s neuron built with no argument behave as
    SpikingJelly's nodes built with none (surrogate Sigmoid(alpha=4), ...): same spikes and
    gradients; ``store_v_seq`` keeps V after every step as SpikingJelly does, and ``convert``
    carries it over."""
    neuron = _sj()[2]
    SJ_NEURONS = {"if": neuron.IFNode, "lif": neuron.LIFNode, "plif": neuron.ParametricLIFNode}
    ours_cls = {"if": IF, "lif": LIF, "plif": PLIF}[kind]
    x = torch.randn(5, 3, 7) * 1.5 + 0.5
    pairs = [(ours_cls(step_mode=step_mode), SJ_NEURONS[kind](step_mode=step_mode))]
    if step_mode == "m":
        pairs.append((LIFConv2d(2, 2, 1, neuron=kind).neuron, SJ_NEURONS[kind](step_mode="m")))
        stored = convert(torch.nn.Sequential(SJ_NEURONS[kind](step_mode="m", store_v_seq=True)))[0]
        pairs.append((stored, SJ_NEURONS[kind](step_mode="m", store_v_seq=True)))
    for mine, sj in pairs:
        grads = []
        for node in (mine, sj):
            xi = x.clone().requires_grad_()
            s = torch.stack([node(xt) for xt in xi]) if step_mode == "s" else node(xi)
            (s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum().backward()
            grads.append((s.detach(), xi.grad))
        assert torch.equal(grads[0][0], grads[1][0]), "spikes"
        assert_close(grads[0][1], grads[1][1], 1e-5, 1e-4, f"{kind} default surrogate grad")
        if getattr(sj, "store_v_seq", False):
            assert mine.store_v_seq and mine.v_seq.shape == x.shape
            assert_close(mine.v_seq.detach(), sj.v_seq.detach(), 1e-6, 1e-6, "v_seq")


def test_bad_arguments():
    with pytest.raises(ValueError, match="neuron"):
        LIFConv2d(2, 2, 3, neuron="relu")
    with pytest.raises(ValueError, match="padding_mode"):
        LIFConv2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding"):
        LIFConv2d(2, 2, 3, padding="same")
    with pytest.raises(ValueError, match="multi-step"):
        LIFConv2d(2, 2, 3, neuron=IF(step_mode="s"))
    m = LIFConv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]"):
        m(torch.rand(2, 2, 5, 5))
    with pytest.raises(ValueError, match="in_channels=2"):
        m(torch.rand(1, 2, 3, 5, 5))
