"""bench/bench_cbp_step.py's restore point: every timed CBP step must compute the same step.
Without it the bench's repeated steps memorize its one random image and, once the loss gradient
falls below 1e-30, time the CPU's denormal handling instead (the module's docstring)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _restore_point():
    sys.path.insert(0, str(BENCH))  # the suites import each other (and harness) by bare name
    try:
        from bench_cbp_step import _restore_point
    finally:
        sys.path.remove(str(BENCH))
    return _restore_point


def test_restore_point_repeats_the_same_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, target = torch.randn(2, 2, 6, 6), torch.tensor([0, 2])

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), target).backward()
        opt.step()

    def state():
        momentum = [opt.state[p]["momentum_buffer"] for p in net.parameters()]
        return [t.detach().clone() for t in (*net.parameters(), *net.buffers(), *momentum)]

    restore = _restore_point()(net, opt)
    step()  # creates the momentum buffers
    restore()  # saves
    saved = state()
    step()
    after_one = state()
    assert any(not torch.equal(a, b) for a, b in zip(saved, after_one))  # the step moved something
    for _ in range(2):
        restore()
        assert all(torch.equal(a, b) for a, b in zip(saved, state()))
        step()
        assert all(torch.equal(a, b) for a, b in zip(after_one, state()))
