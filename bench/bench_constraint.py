"""The fused CBP constraint pass on the 35 quantized weight tensors of SEW-ResNet-34 (21.3M
weights; the first conv and the classifier stay unquantized), one training step's worth:
sum(lambda*cs(w; g)) and lambda*dcs/dw added into w.grad.

Providers (same inputs, same results, checked before timing):
- ``fused``: ``constraint_pass`` (one multi-tensor kernel; also returns sum cs for CFS);
- ``eager``: the CBP authors' way: per layer a custom autograd Function (masks per interval,
  as their ``constraint``), ``(lambda * cs).sum()`` summed over layers, then ``backward()``;
- ``compiled``: ``torch.compile`` of that per-layer loss (dynamic shapes: one graph for every layer).

The pass is memory-bound: it reads w, lambda, grad and writes grad (16 bytes per float32
weight); ``pct_of_copy_bw`` compares its bandwidth with a large tensor copy timed in the same run.

The multiplier update on the same weights (``test_multiplier_step``, Adam ascent at g = 3):
- ``fused``: ``multiplier_step`` (one multi-tensor pass: reads w, lambda, m, v and writes
  lambda, m, v, 28 bytes per weight);
- ``old``: ``constraint_pass(lambda_grads=...)`` writing cs into lambda.grad, then
  ``torch.optim.Adam(maximize=True).step()`` (the quantizer's former way).

    python -m pytest bench/bench_constraint.py --benchmark-json=bench/results/<device>/bench_constraint.json
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from cbp_kernels.ops import constraint_pass, multiplier_step
from harness import copy_bandwidth, run

TERNARY = torch.tensor([-1.0, 0.0, 1.0])
G = 3.0
LR_MULTIPLIER = 0.01


def sew_resnet34_quantized_shapes() -> list[tuple[int, ...]]:
    """Conv weights of ResNet-34's four stages (3, 4, 6, 3 basic blocks; 1x1 downsample in the
    first block of stages 2-4), i.e. every conv/linear weight but conv1 and fc: 35 tensors."""
    shapes, c_in = [], 64
    for c_out, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(c_out, c_in if b == 0 else c_out, 3, 3), (c_out, c_out, 3, 3)]
            if b == 0 and c_in != c_out:
                shapes.append((c_out, c_in, 1, 1))
        c_in = c_out
    return shapes


SHAPES = sew_resnet34_quantized_shapes()
N_WEIGHTS = sum(torch.Size(s).numel() for s in SHAPES)
assert len(SHAPES) == 35 and N_WEIGHTS == 21_258_240


class _AuthorsConstraint(torch.autograd.Function):
    """cs(w; g) the authors' way (dooseokjeong/CBP module.py): a triangle per interval from
    min/max, the window masked out, and a backward of per-interval masks (same conventions as
    reference.py: window [m - d/(2g), m + d/(2g)), right derivative)."""

    @staticmethod
    def forward(ctx, w, lv, g):
        ctx.save_for_backward(w, lv)
        ctx.g = g
        out = torch.clamp((lv[0] - w) * 2, min=0) + torch.clamp((w - lv[-1]) * 2, min=0)
        for j in range(lv.numel() - 1):
            lo, hi = lv[j], lv[j + 1]
            d, m = hi - lo, (lo + hi) * 0.5
            tri = torch.clamp(torch.minimum(w - lo, hi - w) * 2, min=0)
            h = d / (2 * g)
            out = out + torch.where((w >= m - h) & (w < m + h), 0.0, tri)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, lv = ctx.saved_tensors
        slope = torch.where(w < lv[0], -2.0, 0.0) + torch.where(w >= lv[-1], 2.0, 0.0)
        for j in range(lv.numel() - 1):
            lo, hi = lv[j], lv[j + 1]
            d, m = hi - lo, (lo + hi) * 0.5
            h = d / (2 * ctx.g)
            slope = slope + torch.where((w >= lo) & (w < m - h), 2.0, 0.0) + torch.where((w >= m + h) & (w < hi), -2.0, 0.0)
        return grad * slope, None, None


def _layer_term(w, lam, lv, g):
    return (lam * _AuthorsConstraint.apply(w, lv, g)).sum()


_compiled_layer_term = torch.compile(_layer_term, dynamic=True)


def _step(term):
    def step(weights, lambdas, levels_per_layer):
        loss = sum(term(w, lam, lv, G) for w, lam, lv in zip(weights, lambdas, levels_per_layer))
        loss.backward()
        return loss

    return step


@pytest.fixture(scope="module")
def model():
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=gen) * 0.05).requires_grad_() for s in SHAPES]
    for w in weights:
        w.grad = torch.zeros_like(w)
    lambdas = [torch.rand(s, generator=gen) for s in SHAPES]
    scales = torch.stack([w.detach().abs().mean() for w in weights])
    levels_per_layer = [s * TERNARY for s in scales]
    return weights, lambdas, scales, levels_per_layer


@pytest.fixture(scope="module")
def bandwidth():
    return copy_bandwidth()


def _extra(bandwidth):
    # The load average is recorded because this CPU is shared: timings taken under load are
    # comparable only within one run.
    return dict(n_weights=N_WEIGHTS, n_tensors=len(SHAPES), bytes_moved=16 * N_WEIGHTS, copy_bw_gbs=bandwidth,
                load_avg_1min=os.getloadavg()[0], threads=torch.get_num_threads())


def test_results_agree(model):
    weights, lambdas, scales, levels_per_layer = model
    ws = [w.detach() for w in weights[:4]]
    fused_grads = [torch.zeros_like(w) for w in ws]
    lag, _ = constraint_pass(ws, lambdas[:4], TERNARY, scales[:4], G, grads=fused_grads)
    for w in weights[:4]:
        w.grad = None
    eager = _step(_layer_term)(weights[:4], lambdas[:4], levels_per_layer[:4])
    torch.testing.assert_close(lag, eager.detach().double(), rtol=1e-5, atol=1e-3)
    for w, fg in zip(weights[:4], fused_grads):
        torch.testing.assert_close(w.grad, fg)
        w.grad = torch.zeros_like(w)


@pytest.mark.parametrize("provider", ["fused", "eager", "compiled"])
def test_constraint_pass(benchmark, model, bandwidth, provider):
    weights, lambdas, scales, levels_per_layer = model
    if provider == "fused":
        ws, grads = [w.detach() for w in weights], [w.grad for w in weights]

        def fn():
            return constraint_pass(ws, lambdas, TERNARY, scales, G, grads=grads)

        run(benchmark, fn, rounds=10, provider=provider, **_extra(bandwidth))
    else:
        step = _step(_layer_term if provider == "eager" else _compiled_layer_term)
        # eager takes seconds per call on this shared CPU: one warm-up (the compiled one
        # compiles in it) and few rounds keep the suite near a minute.
        run(benchmark, step, weights, lambdas, levels_per_layer, rounds=1 if provider == "eager" else 2, warmup=1,
            provider=provider, **_extra(bandwidth))
    best = benchmark.stats.stats.min
    benchmark.extra_info["achieved_gbs"] = 16 * N_WEIGHTS / best / 1e9
    benchmark.extra_info["pct_of_copy_bw"] = 100 * benchmark.extra_info["achieved_gbs"] / bandwidth


def _multiplier_updates(weights, scales):
    """(fused, old): two callables, each one multiplier update of its own lambda (from 0) and
    Adam state, and the function returning (lambda, exp_avg, exp_avg_sq) of each."""
    fused_state = [[torch.zeros_like(w) for w in weights] for _ in range(3)]
    steps = itertools.count(1)

    def fused():
        multiplier_step(weights, *fused_state, TERNARY, scales, G, step=next(steps), lr=LR_MULTIPLIER)

    lambdas = [torch.zeros_like(w) for w in weights]
    for lam in lambdas:
        lam.grad = torch.zeros_like(lam)
    opt = torch.optim.Adam(lambdas, lr=LR_MULTIPLIER, maximize=True)

    def old():
        constraint_pass(weights, lambdas, TERNARY, scales, G, lambda_grads=[lam.grad for lam in lambdas])
        opt.step()

    def states():
        return fused_state, [lambdas, [opt.state[lam]["exp_avg"] for lam in lambdas],
                             [opt.state[lam]["exp_avg_sq"] for lam in lambdas]]

    return fused, old, states


def test_multiplier_results_agree(model):
    weights, _, scales, _ = model
    fused, old, states = _multiplier_updates([w.detach() for w in weights[:4]], scales[:4])
    for _ in range(2):
        fused()
        old()
    for xs, ys in zip(*states()):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7)  # a few ulp: torch's FMAs and sqrt


@pytest.mark.parametrize("provider", ["fused", "old"])
def test_multiplier_step(benchmark, model, bandwidth, provider):
    weights, _, scales, _ = model
    fused, old, _ = _multiplier_updates([w.detach() for w in weights], scales)
    run(benchmark, fused if provider == "fused" else old, rounds=5, provider=provider,
        **{**_extra(bandwidth), "bytes_moved": 28 * N_WEIGHTS})
    best = benchmark.stats.stats.min
    benchmark.extra_info["achieved_gbs"] = 28 * N_WEIGHTS / best / 1e9
    benchmark.extra_info["pct_of_copy_bw"] = 100 * benchmark.extra_info["achieved_gbs"] / bandwidth
