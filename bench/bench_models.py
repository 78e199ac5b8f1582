"""SEW-ResNet-18 training step (forward + backward, 224x224, T=4): cbp_kernels' model against
the same model in SpikingJelly 2.0 (IF neurons, ATan, detach_reset; its neuron ops choose their
fastest implementation themselves: on CUDA native CUDA > Triton > PyTorch, on CPU its fused
PyTorch kernels, the only ones it has there). Reports samples/s and peak memory.

    pytest bench/bench_models.py --benchmark-json=bench/results/<device>/bench_models.json

CPU: batch 1 and 2 timed rounds (a step takes seconds on a small CPU); CUDA: batch 32. The
recorded CPU results ran with OMP_NUM_THREADS=1: this 2-core machine is shared, and OpenMP
threads competing with other processes make multi-threaded timings meaningless here.
The spikes saved for the backward are the same values in both models: cbp_kernels stores them
at 1 bit (8 for SEW ADD sums), SpikingJelly at 32.

``test_packed_inference``: inference of packed SEW-ResNet-18 (224x224) and 7B-Net (DVS
128x128), binary weights on every spiking conv, T=4, the fused packed LIF layers
(``LIFConv2d.pack()``: one ``packed_conv2d_lif`` each) against the unfused chain (popcount
conv, float affine, neuron module): samples/s and peak memory.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import device_name, peak_memory, run

from cbp_kernels import models
from cbp_kernels.models.interop import load_checkpoint
from peers import spikingjelly_model_zoo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32 if DEVICE == "cuda" else 1
ROUNDS = 5 if DEVICE == "cuda" else 2
T, SIZE, CLASSES = 4, 224, 1000


def _spikingjelly():
    from spikingjelly.activation_based import functional, neuron, surrogate

    net = spikingjelly_model_zoo().sew_resnet.sew_resnet18(
        cnf="ADD", spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=CLASSES)
    functional.set_step_mode(net, "m")
    return net, lambda: functional.reset_net(net)


def _ours(sj_net):
    net = models.sew_resnet18(cnf="ADD", num_classes=CLASSES)
    load_checkpoint(net, sj_net.state_dict())  # the same weights
    return net, net.reset


@pytest.mark.parametrize("provider", ["cbp_kernels", "spikingjelly"])
def test_sew_resnet18_train_step(benchmark, provider):
    torch.manual_seed(0)
    sj_net, sj_reset = _spikingjelly()
    net, reset = (sj_net, sj_reset) if provider == "spikingjelly" else _ours(sj_net)
    net = net.to(DEVICE).train()
    x = torch.rand(T, BATCH, 3, SIZE, SIZE, device=DEVICE)
    target = torch.randint(0, CLASSES, (BATCH,), device=DEVICE)

    def step():
        loss = F.cross_entropy(net(x).mean(0), target)
        loss.backward()
        reset()
        net.zero_grad(set_to_none=True)

    peak = peak_memory(step, DEVICE)
    run(benchmark, step, device=DEVICE, rounds=ROUNDS, warmup=1, provider=provider, batch=BATCH, T=T,
        image=SIZE, peak_memory_bytes=peak)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(samples_per_s=BATCH / mean, device=device_name(DEVICE), threads=torch.get_num_threads())


# ------------------------------------------------------------------ packed inference
class _UnfusedPackedLIFConv2d(torch.nn.Module):
    """A packed LIF layer as the library ran it before the fused op: ``PackedConv2d`` (float
    output), the per-channel affine in float, then the neuron module (float activations)."""

    def __init__(self, packed):
        super().__init__()
        from cbp_kernels.nn import IF, LIF

        kw = dict(packed.neuron)
        kind = kw.pop("neuron")
        self.conv, self.gain, self.shift = packed.conv, packed.gain, packed.shift
        self.neuron = IF(step_mode="m", **kw) if kind == "if" else LIF(step_mode="m", **kw)

    def forward(self, x):
        y = self.conv(x)
        y = y if self.gain is None else y * self.gain.view(-1, 1, 1)
        return self.neuron(y if self.shift is None else y + self.shift.view(-1, 1, 1))

    def reset(self):
        self.neuron.reset()


PACKED_MODELS = {  # name -> (builder, input [C, H, W])
    "sew_resnet18": (lambda: models.sew_resnet18(cnf="ADD", num_classes=CLASSES), (3, SIZE, SIZE)),
    "seven_b_net": (lambda: models.seven_b_net(cnf="ADD"), (2, 128, 128)),
}


def _packed_model(name: str, fused: bool):
    """``name`` with binary weights on its spiking LIFConv2d layers (all but the stem, which
    reads the analog input), packed by ``pack_model`` (fused: ``PackedLIFConv2d``, one
    ``packed_conv2d_lif`` per layer), or with each packed layer run as the unfused chain."""
    from cbp_kernels.export import pack_model
    from cbp_kernels.nn import LIFConv2d

    torch.manual_seed(0)
    builder, shape = PACKED_MODELS[name]
    net = builder().eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, LIFConv2d)][1:]
    with torch.no_grad():
        for n in convs:
            w = net.get_submodule(n).weight
            w.copy_(torch.where(w >= 0, 1.0, -1.0) * w.abs().mean())
    pack_model(net, dict.fromkeys(convs, "binary"))
    if not fused:
        for n in convs:
            net.set_submodule(n, _UnfusedPackedLIFConv2d(net.get_submodule(n)))
    return net.to(DEVICE), shape


@pytest.mark.parametrize("provider", ["fused", "unfused"])
@pytest.mark.parametrize("model", list(PACKED_MODELS))
def test_packed_inference(benchmark, model, provider):
    """Inference of the packed model (binary spiking convs, T=4): ``fused`` runs one
    ``packed_conv2d_lif`` per LIF conv (no float activation), ``unfused`` the popcount conv,
    a float affine and the neuron (tests/test_lifconv.py checks one layer of each against the
    other, bit for bit with a power-of-two scale)."""
    net, shape = _packed_model(model, provider == "fused")
    x = torch.rand(T, BATCH, *shape, device=DEVICE)

    @torch.no_grad()
    def infer():
        out = net(x)
        net.reset()
        return out

    peak = peak_memory(infer, DEVICE)
    run(benchmark, infer, device=DEVICE, rounds=ROUNDS, warmup=1, model=model, provider=provider, batch=BATCH, T=T,
        peak_memory_bytes=peak)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(samples_per_s=BATCH / mean, device=device_name(DEVICE), threads=torch.get_num_threads())
