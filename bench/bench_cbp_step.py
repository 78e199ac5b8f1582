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

Each in float32 and under AMP (``precision="amp"``: bfloat16 autocast on CPU, float16 on
CUDA), the same for both: the forward and the loss under ``torch.autocast``, float32 weights,
lambda and constraint; float16 through a ``GradScaler`` (ours: ``CBPConfig(amp=...)``, which
unscales before the clip; the authors' ``--amp`` clips the scaled gradients), bfloat16 with none.

The multiplier (lambda) update runs once per epoch in both, so it is not part of a step.

Every timed step starts from the same state: the model's parameters and buffers and the
optimizer's momentum as they are after one step (``_restore_point``, untimed, before each
call). Without it the steps would run on: lr 0.1 on one fixed random image with a random label
memorizes it in about 3 steps (cross-entropy 6.7, 0.026, 2e-6, then 0.0 in float32) and the
logit margin grows by 4-10 per step; once it passes about 70 the loss gradient at the logits,
exp(-margin), is below 1e-30, the whole backward carries gradients of 1e-33..1e-37, and the
convolution backward's products underflow to denormal floats, which the CPU handles in
microcode. On this project's Xeon (one thread, float32, batch 1) ours took 0.45 s a step for
11 steps, then 2.0, 12.5 and 20-21 s from the 14th (the authors' way: 1.1 s, then 2.4, 14 and
21 s), 97% of it in ``convolution_backward``; with ``torch.set_flush_denormal(True)`` ours
stayed at 0.45 s. Those steps time the CPU's denormal handling on a loss gradient that is
numerically nothing beside the constraint's, not the step of a training run (README, "The CBP
quantizer": denormals in CPU training).

    OMP_NUM_THREADS=1 python -m pytest bench/bench_cbp_step.py --benchmark-json=...

Batch 1 and 8, on one torch thread and on every core in one run (CPU), in a
group per precision, batch and thread count. CPU: 2 timed rounds (a step takes seconds here);
CUDA: 5.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_constraint import _layer_term
from bench_models import _ours, _spikingjelly
from harness import num_threads, peak_memory, run, thread_counts
from torch import nn
from torch.nn.utils import parametrize

from cbp_kernels.quant import CBPConfig, CBPQuantizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = (1, 8)
THREADS = thread_counts(DEVICE)
AMP = "fp16" if DEVICE == "cuda" else "bf16"  # the autocast dtype of precision="amp" (CBPConfig.amp's names)
AMP_DTYPE = torch.float16 if AMP == "fp16" else torch.bfloat16
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


def _restore_point(net: nn.Module, opt: torch.optim.Optimizer):
    """A ``setup`` for ``harness.run``: its first call saves the model's parameters and buffers
    and the optimizer's state tensors, every later call copies back in place those that differ
    (so every timed step computes the same step with normal-range gradients; see the module
    docstring)."""
    saved: list[torch.Tensor] = []

    def tensors() -> list[torch.Tensor]:
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return [*net.parameters(), *net.buffers(), *state]

    @torch.no_grad()
    def setup() -> None:
        if not saved:
            saved.extend(t.detach().clone() for t in tensors())
            return
        for t, s in zip(tensors(), saved, strict=True):
            if not torch.equal(t, s):  # what a step never writes (the quantizer's levels and scale)
                t.copy_(s)             # keeps its _version, as in training

    return setup


def _authors_step(net, reset, lambdas, x, target, amp: bool):
    layers = _quantized_layers(net)
    levels = [(BINARY * m.weight.detach().abs().mean()).to(DEVICE) for m in layers]
    for m, lv in zip(layers, levels):
        parametrize.register_parametrization(m, "weight", _Quantized(lv))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    raw = [m.parametrizations.weight.original for m in layers]

    scaler = torch.amp.GradScaler(DEVICE, enabled=amp and AMP == "fp16")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=AMP_DTYPE, enabled=amp):
            loss = F.cross_entropy(net(x).mean(0), target)
            loss = loss + sum(_layer_term(w, lam, lv, G) for w, lam, lv in zip(raw, lambdas, levels))
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), 1.0)  # on the scaled gradients, as their --amp
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for w in raw:
                w.clamp_(-1, 1)
        reset()

    return step, _restore_point(net, opt)


def _our_step(net, reset, lambdas, x, target, amp: bool):
    q = CBPQuantizer(net, "binary", config=CBPConfig(optimizer="sgd", lr=0.1, momentum=0.9, g=int(G),
                                                     amp=AMP if amp else None))
    with torch.no_grad():
        for mine, theirs in zip(q.lambdas, lambdas):
            mine.copy_(theirs)

    def step():
        with torch.autocast(DEVICE, dtype=AMP_DTYPE, enabled=amp):
            loss = F.cross_entropy(net(x).mean(0), target)
        q.step(loss)
        reset()

    return step, _restore_point(net, q.weight_optimizer)


@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}thr")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("precision", ["float32", "amp"])
@pytest.mark.parametrize("provider", ["cbp_kernels", "authors"])
def test_cbp_training_step(benchmark, provider, precision, batch, threads):
    with num_threads(threads):
        torch.manual_seed(0)
        sj_net, sj_reset = _spikingjelly()
        net, reset = (sj_net, sj_reset) if provider == "authors" else _ours(sj_net)
        net = net.to(DEVICE).train()
        lambdas = [torch.rand_like(m.weight) * 1e-3 for m in _quantized_layers(net)]
        x = torch.rand(T, batch, 3, SIZE, SIZE, device=DEVICE)
        target = torch.randint(0, CLASSES, (batch,), device=DEVICE)
        make = _authors_step if provider == "authors" else _our_step
        step, restore = make(net, reset, lambdas, x, target, precision == "amp")
        peak = peak_memory(step, DEVICE)  # the first step: creates the momentum buffers
        name = f"{AMP} autocast" if precision == "amp" else precision
        benchmark.group = f"CBP step SEW-ResNet-18, {name}, batch {batch}, {threads} thread(s)"
        role = "baseline" if provider == "authors" else "ours"
        run(benchmark, step, device=DEVICE, rounds=ROUNDS, warmup=1, setup=restore, provider=provider, role=role,
            batch=batch, T=T, image=SIZE, precision=name, peak_memory_bytes=peak, threads=threads)
        if benchmark.stats:  # None under --benchmark-disable
            benchmark.extra_info.update(samples_per_s=batch / benchmark.stats.stats.mean)
