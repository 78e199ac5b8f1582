"""Lock-step: CBPQuantizer against a port of the CBP authors' training loops.

The port below is our own compact re-implementation of the update logic of the authors'
public code, yoees/CBP-QSNN at commit 006ec63 (no line of it is copied):

- STBP: ``CBP-QSNNs/CBP-QSNN-STBP/main_quantize_cbp.py`` (``train``, the epoch loop of
  ``main``): SGD (momentum 0.9) over every parameter, ``clip_grad_value_(model.parameters(), 1)``,
  quantized weights clamped to +-1, Adam(maximize) on lambda, lr x 0.1 when g reaches 20;
- TSSL-BP: ``CBP-QSNNs/CBP-QSNN-TSSL-BP/main_quantize_cbp.py``: AdamW (weight decay 0.01)
  over the quantized weights only (``optimizer.zero_grad()`` zeroes only theirs, so the
  first and last layers' gradients accumulate), ``clip_grad_norm_(every layer weight, 1)``,
  ``weight_clipper`` (other layers to +-4, quantized to +-1), AdamW on lambda, no lr drop.

Both: one lambda step before the first epoch; per epoch p += 1, and if L_sum >= L_pre or
p == p_max: g += 1 (below 10) or 10, lambda steps on cs(W; g), L_pre = 1e10, p = 0; else
L_pre = L_sum. Q(W) is their ``Quantizetotal`` (sign thresholds at the midpoints b * s, scale
s = mean|W| once), the neuron their STBP ``mem_update`` (mem = mem * decay * (1 - spike) + I,
spike = mem > thresh, box-car surrogate of half-width lens) and the loss their MSE on the
output spike rate; the model of our side is the same layers with ``cbp_kernels.nn.LIF``
(tau = 1 / (1 - decay), decay_input=False, rectangle surrogate).

The two documented float-rounding differences are neutralised in the port (its own
formulas are checked against them in ``test_port_formulas_agree_up_to_rounding``):
1. cs and dcs/dw: the authors' ``constraint`` computes the triangle as
   min((w - q_lo)/(m - q_lo), (w - q_hi)/(m - q_hi)) * d and leaves cs = d (1 - 1/g) at a
   window's left edge; the port uses ``ops.constraint.reference`` (2 |w - Q(w)|, the paper's eps).
2. the multiplier step: torch's CPU Adam fuses operations (FMA) and its float32 sqrt is not
   always correctly rounded; the port steps lambda with the reference's Adam, which
   ``test_quant.py::test_multiplier_optimizer_is_torch_adam_ascent`` checks against torch's.
and L_sum is summed in float64 on both sides (theirs is a float32 tensor).

At T = 1 the neurons compute the same floats (H = I), so the runs must agree bit for bit;
at T = 4 the leak rounds differently (V * decay against V - V / tau), so spikes may flip:
at most 1 % of the weights may end on another level.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from cbp_kernels.nn import LIF
from cbp_kernels.ops import quantize
from cbp_kernels.ops.constraint import reference as R
from cbp_kernels.quant import CBPQuantizer, get_preset, resolve_levels

DECAY, THRESH, LENS = 0.25, 0.5, 0.5  # the STBP code's defaults (--decay, --thresh, --lens)
EPOCHS = 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread (OpenMP's spin-waits on a loaded 2-core machine cost 10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the port ---------------------------------------------------------------------------------------

class _BoxCar(torch.autograd.Function):
    """Their ``ActFun``: spike = mem > thresh; d spike / d mem = 1{|mem - thresh| < lens} / (2 lens)."""

    @staticmethod
    def forward(ctx, mem):
        ctx.save_for_backward(mem)
        return mem.gt(THRESH).float()

    @staticmethod
    def backward(ctx, grad):
        mem, = ctx.saved_tensors
        return grad * ((mem - THRESH).abs() < LENS).float() / (2 * LENS)


def authors_quantize(w, scale, levels):
    """Their ``Quantizetotal`` forward: sum_j d_j (sign(w - b_j s) + 1) / 2, minus 1, times s
    (levels -1..1 with unit steps as theirs: binary d = [2], ternary d = [1, 1])."""
    out = torch.zeros_like(w)
    for lo, hi in zip(levels[:-1].tolist(), levels[1:].tolist()):
        out = out + (hi - lo) * (torch.sign(w - (lo + hi) / 2 * scale) + 1) / 2
    return (out - 1) * scale


def authors_cs(w, scale, levels, g):
    """Their ``constraint`` forward (windowed cs; g = 1 / (1 - ucs)), for the rounding check."""
    ucs = 1 - 1 / g
    lv = (levels * scale).tolist()
    out = torch.clamp((w - lv[0]) * -2, min=0) + torch.clamp((w - lv[-1]) * 2, min=0)
    for lo, hi in zip(lv[:-1], lv[1:]):
        mid = (lo + hi) / 2
        line = torch.clamp(torch.minimum((w - lo) / (mid - lo), (w - hi) / (mid - hi)) * (hi - lo), min=0)
        out = out + torch.where(line > (hi - lo) * ucs, torch.zeros_like(line), line)
    return out


class PortNet(nn.Module):
    """Their spiking MLP: per step each layer integrates I = W x (+ b) into mem; the
    quantized layers compute with ``authors_quantize``; the output is the last layer's
    spike count / T."""

    def __init__(self, linears, quantized, levels, T):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.quantized, self.levels, self.T = quantized, levels, T
        self.scales = {i: self.linears[i].weight.detach().abs().mean() for i in quantized}  # once, as theirs

    def weight(self, i):
        w = self.linears[i].weight
        if i not in self.quantized:
            return w
        return w + (authors_quantize(w.detach(), self.scales[i], self.levels) - w.detach())  # straight-through

    def forward(self, x):
        mems = [0.0] * len(self.linears)
        spikes = [0.0] * len(self.linears)
        total = 0.0
        for _ in range(self.T):
            h = x
            for i, layer in enumerate(self.linears):
                mems[i] = mems[i] * DECAY * (1.0 - spikes[i]) + nn.functional.linear(h, self.weight(i), layer.bias)
                spikes[i] = _BoxCar.apply(mems[i])
                h = spikes[i]
            total = total + h
        return total / self.T


def port_run(net: PortNet, loader, loss_fn, recipe: str, lr: float, lr_lambda: float, p_max: int, seed: int):
    """The authors' loop (module doc) on ``net``; returns (update epochs, lambdas)."""
    qw = [net.linears[i].weight for i in net.quantized]
    scales = torch.stack([net.scales[i] for i in net.quantized])
    levels = net.levels
    if recipe == "stbp":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        lam_wd, decoupled = 0.0, False
    else:
        opt = torch.optim.AdamW(qw, lr=lr)  # torch's default weight decay 0.01
        lam_wd, decoupled = 1e-2, True
    lam = [torch.zeros_like(w) for w in qw]
    m, v = [torch.zeros_like(w) for w in qw], [torch.zeros_like(w) for w in qw]
    steps = 0

    def update_lambda(g):  # gradient ascent on sum(lambda * cs(W; g)): the reference Adam (doc, point 2)
        nonlocal steps
        steps += 1
        R.multiplier_step([w.detach() for w in qw], lam, m, v, R.level_table(levels, scales, g),
                          R.adam_scalars(steps, lr_lambda, (0.9, 0.999), 1e-8, lam_wd, decoupled))

    g, period, lagsum_pre, updates = 1, 0, 1e10, []
    update_lambda(g)
    for epoch in range(EPOCHS):
        torch.manual_seed(seed + epoch)  # the batch order of QuantTrainer.fit
        lagsum = 0.0
        for x, y in loader:
            if recipe == "stbp":
                net.zero_grad()
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            penalty = sum(float((l * R.cs(w.detach(), levels, s, g)).double().sum()) for w, l, s in zip(qw, lam, scales))
            lagsum += float(loss.detach()) + penalty
            loss.backward()
            for w, l, s in zip(qw, lam, scales):  # d(lambda * cs)/dw (doc, point 1)
                w.grad = w.grad + l * R.cs_grad(w.detach(), levels, s, g)
            if recipe == "stbp":
                torch.nn.utils.clip_grad_value_(net.parameters(), 1)
            else:
                torch.nn.utils.clip_grad_norm_([layer.weight for layer in net.linears], 1)
            opt.step()
            with torch.no_grad():
                if recipe == "tssl":  # weight_clipper
                    for i, layer in enumerate(net.linears):
                        layer.weight.clamp_(-1 if i in net.quantized else -4, 1 if i in net.quantized else 4)
                for w in qw:
                    w.clamp_(-1, 1)
        period += 1
        if lagsum >= lagsum_pre or period == p_max:
            g = g + 1 if g < 10 else g + 10
            if recipe == "stbp" and g == 20:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            update_lambda(g)
            lagsum_pre, period = 1e10, 0
            updates.append(epoch)
        else:
            lagsum_pre = lagsum
    return updates, lam


# --- the comparison ---------------------------------------------------------------------------------

def _linears(recipe):
    torch.manual_seed(0)
    bias = recipe == "stbp"  # their TSSL-BP layers have no bias
    layers = [nn.Linear(8, 24, bias=bias), nn.Linear(24, 24, bias=bias), nn.Linear(24, 24, bias=bias),
              nn.Linear(24, 4, bias=bias)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)  # a pre-trained net that spikes
    return layers


def _loader():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


def _mse(rate, y):  # their criterion: MSE of the output spike rate against one-hot labels
    return nn.functional.mse_loss(rate, nn.functional.one_hot(y, 4).float())


RECIPES = {"stbp": ("stbp/cifar10", 0.05, 0.05), "tssl": ("tssl-bp/cifar10", 5e-3, 0.05)}


def _both(recipe, levels, T):
    preset, lr, lr_lambda = RECIPES[recipe]
    p_max = 3
    layers = _linears(recipe)
    port = PortNet(copy.deepcopy(layers), [1, 2], resolve_levels(levels), T)
    ours = nn.Sequential(*[m for layer in layers
                           for m in (layer, LIF(tau=1 / (1 - DECAY), decay_input=False, v_threshold=THRESH,
                                                surrogate_function="rectangle", step_mode="m"))])
    for layer in layers[1:]:
        layer.input_max = 1  # they read spikes: the integer forward would apply
    # the float32 forward F.linear(x, Q(W)), as the authors' code (the integer forward, exact,
    # rounds the layer outputs differently)
    cfg = dataclasses.replace(get_preset(preset), lr=lr, lr_multiplier=lr_lambda, p_max=p_max, seed=0,
                              integer_forward=False)
    q = CBPQuantizer(ours, levels, config=cfg)
    assert q.integer_layers == []
    for i, layer in zip(port.quantized, q.layers.values()):
        assert torch.equal(port.scales[i], layer.weight_scale)  # s = mean|W| once, on both sides
    history = q.fit(_loader(), _mse, epochs=EPOCHS, forward_fn=lambda m, x: m(x.expand(T, *x.shape)).mean(0),
                    progress=False)
    updates, lam = port_run(port, _loader(), _mse, recipe, lr, lr_lambda, p_max, seed=0)
    return q, port, [r["epoch"] for r in history if r["updated"]], updates, lam


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_lockstep_T1_bit_identical(recipe, levels):
    q, port, ours_updates, port_updates, lam = _both(recipe, levels, T=1)
    assert len(port_updates) >= 5 and ours_updates == port_updates
    for i, w in zip(port.quantized, q.weights):
        assert torch.equal(w.detach(), port.linears[i].weight.detach())
    for mine, theirs in zip(q.lambdas, lam):
        assert torch.equal(mine, theirs)
    others = [m.weight for m in q.net.modules() if isinstance(m, nn.Linear)]
    for mine, theirs in zip(others, port.linears):  # first and last: trained (STBP) or frozen (TSSL-BP) alike
        assert torch.equal(mine.detach(), theirs.weight.detach())


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_lockstep_T4_within_one_percent(recipe, levels):
    q, port, ours_updates, port_updates, _ = _both(recipe, levels, T=4)
    assert len(port_updates) >= 5 and ours_updates == port_updates
    moved = total = 0
    for i, layer in zip(port.quantized, q.layers.values()):
        mine = quantize(layer.weight.detach(), layer.levels, layer.weight_scale)
        theirs = authors_quantize(port.linears[i].weight.detach(), port.scales[i], port.levels)
        moved += int((mine != theirs).sum())
        total += mine.numel()
    assert moved <= 0.01 * total, f"{moved} of {total} weights on another level"


def test_port_formulas_agree_up_to_rounding():
    """The port's own transcriptions of the authors' Q and cs against the reference the loop
    uses: Q equal (no weight on a midpoint), cs equal to float32 rounding."""
    torch.manual_seed(3)
    w = torch.randn(4000) * 0.1
    for name in ("binary", "ternary"):
        levels, s = resolve_levels(name), w.abs().mean()
        assert torch.equal(authors_quantize(w, s, levels), quantize(w, levels, s))
        for g in (1, 2, 5, 30):
            torch.testing.assert_close(authors_cs(w, s, levels, g), R.cs(w, levels, s, g), rtol=1e-5, atol=1e-6)
