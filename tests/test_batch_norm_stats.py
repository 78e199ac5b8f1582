"""ops.batch_norm_stats against aten.native_batch_norm on the CPU, bit for bit: the batch mean
and invstd, the running statistics it updates, the output y rebuilt from them
(nn.bn_neuron.batch_norm_output) and the spikes of BatchNormNeuronFunction; at 1 and 2 threads,
on the AVX-512 and the portable path (cpu/isa.h's switch)."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.nn.bn_neuron import batch_norm_neuron, batch_norm_output
from cbp_kernels.ops.batch_norm_stats import batch_norm_stats

BACKENDS = ["reference", "cpu"]  # CPU only: the op reproduces ATen's CPU arithmetic (see op.py)

# (N, C, H, W, scale, offset): channel counts around the kernel's 8-channel groups (and 4 / 1
# tails), images whose N*H*W is no multiple of 8 (1 pixel, 5x7, 1x3), tiny spreads on a large
# mean (the variance terms round in float32), many channels. Sums of float32 values of one
# magnitude are exact in float64, and a float64 sum's last bits rarely survive the rounding to
# float32, so an order of the additions other than ATen's would mostly go unseen; the "cancel"
# scale makes it visible: +-2^50 in every image row (ulp 0.25 in float64) swallow the small
# values added while the running sum is large, and which ones that are depends on the order.
CASES = [(4, 64, 9, 7, "cancel", 0.0), (3, 67, 5, 7, "cancel", 1e4), (2, 13, 1, 3, 1e-3, -50.0),
         (5, 8, 4, 4, 3.0, 1e6), (1, 512, 3, 3, "cancel", 2.0), (6, 9, 2, 1, "wide", 0.0), (8, 20, 11, 13, 0.5, -7.0)]


def _data(case, seed=0):
    n, c, h, w, scale, offset = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    if scale == "wide":  # magnitudes 2^-30 .. 2^30 in one channel
        return x * torch.exp2(torch.randint(-30, 31, x.shape, generator=gen).float()) + offset
    if scale == "cancel":
        rows = x.view(n, c, -1)
        rows[..., 1 % rows.shape[-1]] += 2.0**50
        rows[..., -2 % rows.shape[-1]] -= 2.0**50
        return x + offset
    return x * scale + offset


def _check(x, backend, momentum, eps):
    c = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    running = [torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5]
    ours_running = [t.clone() for t in running]
    gamma, beta = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, *running, True, momentum, eps)
    our_mean, our_invstd = batch_norm_stats(x, *ours_running, momentum, eps, backend=backend)
    for name, ours, theirs in [("mean", our_mean, mean), ("invstd", our_invstd, invstd),
                               ("running_mean", ours_running[0], running[0]),
                               ("running_var", ours_running[1], running[1]),
                               ("y", batch_norm_output(x, gamma, beta, our_mean, our_invstd, eps), y)]:
        differ = int((ours != theirs).sum())
        assert differ == 0, f"{name}: {differ} of {theirs.numel()} values differ (shape {tuple(x.shape)})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_stats_are_bitwise_native_batch_norm(backend, threads, case):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for momentum, eps in [(0.1, 1e-5), (1 / 3, 1e-3)]:
            _check(_data(case), backend, momentum, eps)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_portable_path_is_bitwise_too(isa, monkeypatch):
    """The kernel without AVX-512 (cpu/isa.h's cap, read per call) gives the same bits."""
    monkeypatch.setenv("CBP_KERNELS_CPU_ISA", isa)
    for case in CASES[:3]:
        _check(_data(case), "cpu", 0.1, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channels_and_zero_eps(backend):
    """Constant channels (variance 0) with eps = 0: invstd 0, as ATen's InvStd; with eps > 0 the
    usual value; a 3-D input (BatchNorm1d's [N, C, L])."""
    x = torch.full((3, 16, 2, 5), 2.5)
    x[:, 8:] = torch.randn(3, 8, 2, 5)
    for eps in (0.0, 1e-5):
        _check(x, backend, 0.1, eps)
    _check(torch.randn(2, 12, 5) * 10 + 3, backend, 0.1, 1e-5)


def test_bn_neuron_forward_is_bitwise_the_unfused_modules():
    """batch_norm_neuron (statistics from the op) against nn.BatchNorm2d then the neuron, 64
    channels: equal spikes, running statistics and step count."""
    from cbp_kernels.nn import LIF

    torch.manual_seed(0)
    z = torch.randn(4 * 2, 64, 7, 9) * 3 + 1
    bns = [torch.nn.BatchNorm2d(64) for _ in range(2)]
    for bn in bns:
        bn.weight.data = torch.linspace(0.5, 2, 64)
        bn.bias.data = torch.linspace(-1, 1, 64)
    neurons = [LIF(v_reset=None, step_mode="m") for _ in range(2)]
    with torch.no_grad():
        fused = batch_norm_neuron(z, bns[0], neurons[0], steps=4)
        unfused = neurons[1](bns[1](z).view(4, 2, 64, 7, 9))
    assert torch.equal(fused, unfused)
    for name, buf in bns[0].named_buffers():
        assert torch.equal(buf, dict(bns[1].named_buffers())[name]), name


def test_bad_arguments():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="x must have dtype"):
        batch_norm_stats(x.double())
    with pytest.raises(ValueError, match="x must be a non-empty contiguous"):
        batch_norm_stats(x.transpose(2, 3))
    with pytest.raises(ValueError, match="running_mean must be a contiguous \\[4\\]"):
        batch_norm_stats(x, torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        batch_norm_stats(x, eps=-1.0)
