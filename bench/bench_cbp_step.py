"""One full CBP training step on SEW-ResNet-18 (224x224, T=4): forward with quantized
weights, backward, the constraint's gradient, gradient clipping, the weight optimizer step,
the clamp to [-1, 1]; binary levels, g = 3, lambda > 0.

Providers (same weights, same lambda, same data):
- ``cbp_kernels``: the library's ``models.sew_resnet18`` under ``CBPQuantizer.step`` (fused
  neuron op, ``quantize`` op per layer, ONE fused constraint pass over all layers);
- ``authors``: the way the CBP authors' public code does it: SpikingJelly's model, an eager
  straight-through quantizer per layer (``torch.nn.utils.parametrize``), and the constraint
  as an eager autograd Function per layer (``bench_constraint._layer_term``) summed into the
  Lagrangian before one ``backward()``.

The multiplier (lambda) update runs once per epoch in both, so it is not part of a step.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_cbp_step.py --benchmark-json=...

CPU: batch 1, 2 timed rounds (a step takes seconds here); CUDA: batch 32, 5 rounds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_constraint import _layer_term
from bench_models import _ours, _spikingjelly
from harness import device_name, peak_memory, run
from torch import nn
from torch.nn.utils import parametrize

from cbp_kernels.quant import CBPConfig, CBPQuantizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32 if DEVICE == "cuda" else 1
ROUNDS = 5 if DEVICE == "cuda" else 2
T, SIZE, CLASSES, G = 4, 224, 1000, 3.0
BINARY = torch.tensor([-1.0, 1.0])


class _AuthorsQuantize(torch.autograd.Function):
    """Q(w) by thresholds at the midpoints, straight-through backward (the authors' quantizer)."""

    @staticmethod
    def forward(ctx, w, lv):
        q = torch.full_like(w, float(lv[0]))
        for j in range(lv.numel() - 1):
            q = torch.where(w >= (lv[j] + lv[j + 1]) * 0.5, lv[j + 1], q)
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Quantized(nn.Module):
    def __init__(self, lv):
        super().__init__()
        self.lv = lv

    def forward(self, w):
        return _AuthorsQuantize.apply(w, self.lv)


def _quantized_layers(net: nn.Module) -> list[nn.Module]:
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[1:-1]  # the first conv and the classifier stay FP32


def _authors_step(net, reset, lambdas, x, target):
    layers = _quantized_layers(net)
    levels = [(BINARY * m.weight.detach().abs().mean()).to(DEVICE) for m in layers]
    for m, lv in zip(layers, levels):
        parametrize.register_parametrization(m, "weight", _Quantized(lv))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    raw = [m.parametrizations.weight.original for m in layers]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x).mean(0), target)
        loss = loss + sum(_layer_term(w, lam, lv, G) for w, lam, lv in zip(raw, lambdas, levels))
        loss.backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for w in raw:
                w.clamp_(-1, 1)
        reset()

    return step


def _our_step(net, reset, lambdas, x, target):
    q = CBPQuantizer(net, "binary", config=CBPConfig(optimizer="sgd", lr=0.1, momentum=0.9, g=int(G)))
    with torch.no_grad():
        for mine, theirs in zip(q.lambdas, lambdas):
            mine.copy_(theirs)

    def step():
        q.step(F.cross_entropy(net(x).mean(0), target))
        reset()

    return step


@pytest.mark.parametrize("provider", ["cbp_kernels", "authors"])
def test_cbp_training_step(benchmark, provider):
    torch.manual_seed(0)
    sj_net, sj_reset = _spikingjelly()
    net, reset = (sj_net, sj_reset) if provider == "authors" else _ours(sj_net)
    net = net.to(DEVICE).train()
    lambdas = [torch.rand_like(m.weight) * 1e-3 for m in _quantized_layers(net)]
    x = torch.rand(T, BATCH, 3, SIZE, SIZE, device=DEVICE)
    target = torch.randint(0, CLASSES, (BATCH,), device=DEVICE)
    make = _authors_step if provider == "authors" else _our_step
    step = make(net, reset, lambdas, x, target)
    peak = peak_memory(step, DEVICE)
    role = "baseline" if provider == "authors" else "ours"
    run(benchmark, step, device=DEVICE, rounds=ROUNDS, warmup=1, provider=provider, role=role, batch=BATCH, T=T,
        image=SIZE, peak_memory_bytes=peak)
    benchmark.extra_info.update(samples_per_s=BATCH / benchmark.stats.stats.mean, device=device_name(DEVICE),
                                threads=torch.get_num_threads())
