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
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import device_name, peak_memory, run

from cbp_kernels import models
from cbp_kernels.models.interop import load_checkpoint, spikingjelly_model_zoo

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
