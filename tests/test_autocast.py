"""Every custom op under mixed precision: ``torch.autocast("cpu", dtype=torch.bfloat16)``, and
``torch.autocast("cuda", dtype=torch.float16)`` where a GPU is present (marked ``gpu``).

The rule (README, "Mixed precision"): no op of ours is on autocast's cast lists (none registers
an autocast kernel, so the AutocastCPU key falls through to it), so each computes in the dtype
of the tensors it is given, as PyTorch's elementwise ops do: the neuron in bfloat16 when
autocast's conv handed it bfloat16, ``quantize`` / the constraint ops / ``sigmoid_quantize`` on
the float32 master weights (autocast's conv casts their output), the packed ops on int32 words
with a float32 output. Each case checks, under autocast, that the compiled CPU kernel ran on
the expected dtype (its calls counted; ``compiled.py`` serves the cpu and cuda backends) and
that every output and gradient is bit for bit the
op's result on the same inputs outside autocast. A planted autocast registration that casts to
float32 (``torch.library.register_autocast``), or a dispatch to the reference under autocast,
fails them.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbp_kernels.nn import LIF
from cbp_kernels.nn.bn_neuron import batch_norm_neuron
from cbp_kernels.ops import (bitpack, bitunpack, constraint_pass, multiplier_step, multistep_neuron, pack_spikes,
                             pack_weight, packed_conv2d, packed_conv2d_lif, packed_linear, quantize)
from cbp_kernels.ops.sigmoid_quant.op import sigmoid_quantize

from conftest import devices

BF16 = torch.bfloat16
LOW = {"cpu": torch.bfloat16, "cuda": torch.float16}  # the autocast dtype tested per device


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled CPU kernels' calls: ``spy("neuron.forward")`` wraps
    ``cbp_kernels.ops.neuron.compiled.forward``; the returned list gets the dtype of the
    kernel's first tensor argument at each call."""

    def spy(name: str) -> list[torch.dtype]:
        package, fn = name.split(".")
        module = importlib.import_module(f"cbp_kernels.ops.{package}.compiled")
        kernel, seen = getattr(module, fn), []

        def counted(*args, **kwargs):
            first = next(a for a in args if isinstance(a, torch.Tensor) or isinstance(a, list) and a)
            seen.append((first[0] if isinstance(first, list) else first).dtype)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, fn, counted)
        return seen

    return spy


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _neuron(x):
    x = _leaf(x)
    spikes, v_last = multistep_neuron(x, neuron="lif", tau=2.0, surrogate="atan")
    (spikes * torch.linspace(-1, 1, spikes.shape[-1], dtype=spikes.dtype, device=x.device)).sum().backward()
    return spikes, v_last, x.grad


def _bn_neuron(z, bn, T=4):
    z, bn, lif = _leaf(z), copy.deepcopy(bn), LIF(step_mode="m", surrogate_function="atan")
    spikes = batch_norm_neuron(z, bn, lif, T)
    (spikes * torch.linspace(-1, 1, spikes.shape[-1], dtype=spikes.dtype, device=z.device)).sum().backward()
    return spikes, lif.v, z.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _quantize(w):
    w = _leaf(w)
    q = quantize(w, torch.tensor([-1.0, 0.0, 1.0]), 0.05)
    (q * torch.arange(q.numel(), device=w.device).view_as(q)).sum().backward()
    return q, w.grad


def _constraint(ws):
    levels, scales = torch.tensor([-1.0, 1.0]), [0.05, 0.1]
    lambdas = [torch.linspace(0, 1e-3, w.numel(), device=w.device).view_as(w) for w in ws]
    grads, lambda_grads = [torch.ones_like(w) for w in ws], [torch.empty_like(w) for w in ws]
    sums = constraint_pass(ws, lambdas, levels, scales, 3.0, grads=grads, lambda_grads=lambda_grads)
    moments = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    multiplier_step(ws, lambdas, *moments, levels, scales, 3.0, step=1, lr=0.01)
    return (*sums, *grads, *lambda_grads, *lambdas, *moments[0], *moments[1])


def _sigmoid_quant(w):
    alpha, beta = _leaf(torch.tensor(0.5, device=w.device)), _leaf(torch.tensor(2.0, device=w.device))
    w = _leaf(w)
    y = sigmoid_quantize(w, alpha, beta, [-1.0, 0.0, 1.0], 5.0)
    (y * torch.arange(y.numel(), device=w.device).view_as(y)).sum().backward()
    return y, w.grad, alpha.grad, beta.grad


def _bitpack(x):
    words = bitpack(x, 1)
    return words, bitunpack(words, 1, x.shape[1], x.dtype)


def _packed(spikes_nhwc, w_q, T=2):
    """packed_conv2d, packed_conv2d_lif and packed_linear on bf16 spikes (NHWC, time folded in N)."""
    x = pack_spikes(spikes_nhwc)
    w = pack_weight(w_q, "binary", 0.25)
    lin = pack_weight(w_q.flatten(1)[:, : spikes_nhwc.shape[-1]].contiguous(), "binary", 0.25)
    return (packed_conv2d(x, w, padding=1), *packed_conv2d_lif(x, w, T, padding=1),
            packed_linear(x[:, 0, 0], lin))


def _cases(device: str = "cpu"):
    """name -> (call, its input on ``device``, {kernel: the dtype it must run on under autocast})."""
    low = LOW[device]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 5, 37, generator=g)  # [T, N, C, H, W], an odd last dim
    z = torch.randn(8, 6, 5, 7, generator=g) * 2 + 0.5  # [T*N, C, H, W], T = 4
    w = torch.randn(7, 5, 3, 3, generator=g) * 0.05
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.2, 0.2, generator=g)
    spikes = (torch.rand(4, 6, 5, 40, generator=g) > 0.6).to(low)  # [T*N, H, W, C], NHWC
    w_q = torch.where(torch.randn(8, 40, 3, 3, generator=g) >= 0, 0.25, -0.25)
    x, z, w, spikes, w_q, bn = (t.to(device) for t in (x, z, w, spikes, w_q, bn))
    return {
        "neuron low": (_neuron, x.to(low), {"neuron.forward": low, "neuron.backward": low}),
        "neuron float32": (_neuron, x, {"neuron.forward": torch.float32, "neuron.backward": torch.float32}),
        "batch_norm_neuron": (lambda t: _bn_neuron(t, bn), z.to(low), {"neuron.forward": low,
                                                                        "neuron.backward": low}),
        "quantize": (_quantize, w, {"constraint.quantize": torch.float32}),
        "constraint_pass + multiplier_step": (_constraint, [w, w[:3].contiguous() * 2],
                                              {"constraint.constraint_pass": torch.float32,
                                               "constraint.multiplier_step": torch.float32}),
        "sigmoid_quantize": (_sigmoid_quant, w, {"sigmoid_quant.forward": torch.float32,
                                                  "sigmoid_quant.backward": torch.float32}),
        "bitpack": (_bitpack, spikes, {"bitpack.pack": low, "bitpack.unpack": torch.int32}),
        "packed convs": (lambda s: _packed(s, w_q), spikes, {"bitpack.pack": low, "bitconv.conv2d": torch.int32,
                                                            "bitconv.conv2d_lif": torch.int32}),
    }


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(_cases()))
def test_op_under_autocast_stays_on_its_kernel(case, device, kernel_calls):
    call, inp, kernels = _cases(device)[case]
    expected = call(inp)  # outside autocast, on the same inputs
    seen = {name: kernel_calls(name) for name in kernels}
    with torch.autocast(device, dtype=LOW[device]):
        got = call(inp)
    for name, dtype in kernels.items():
        assert seen[name] and set(seen[name]) == {dtype}, f"{case}: {name} ran on {seen[name]}, expected {dtype}"
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{case}: output {i} differs under autocast"


def test_cbp_step_under_cpu_bf16_autocast_runs_every_kernel_in_its_dtype(kernel_calls):
    """A CBP training step of SEW-ResNet-18 (tiny input) as ``CBPConfig(amp="bf16")`` runs it:
    every neuron fwd / bwd on the compiled kernel in bfloat16, the per-layer quantize and the
    fused constraint pass on it in float32; float32 gradients on the float32 weights."""
    from cbp_kernels import models
    from cbp_kernels.quant import CBPConfig, CBPQuantizer

    torch.manual_seed(0)
    net = models.sew_resnet18(cnf="ADD", num_classes=10).train()
    q = CBPQuantizer(net, "binary", config=CBPConfig(optimizer="sgd", lr=0.1, g=3, amp="bf16"))
    names = ("neuron.forward", "neuron.backward", "constraint.quantize", "constraint.constraint_pass")
    seen = {name: kernel_calls(name) for name in names}
    x, target = torch.rand(2, 1, 3, 32, 32), torch.tensor([3])
    with torch.autocast("cpu", dtype=BF16):
        loss = F.cross_entropy(net(x).mean(0), target)
    before = [p.detach().clone() for p in net.parameters()]
    q.step(loss)
    spiking = sum(1 for m in net.modules() if hasattr(m, "prepared"))  # one neuron per LIF / IF module
    assert len(seen["neuron.forward"]) == len(seen["neuron.backward"]) == spiking > 0
    assert set(seen["neuron.forward"]) == set(seen["neuron.backward"]) == {BF16}
    assert len(seen["constraint.quantize"]) == len(q.layers) and set(seen["constraint.quantize"]) == {torch.float32}
    assert seen["constraint.constraint_pass"] == [torch.float32]
    params = list(net.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert sum(not torch.equal(p.detach(), b) for p, b in zip(params, before)) > len(q.layers)
