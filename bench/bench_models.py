"""SEW-ResNet-18 training step (forward + backward, 224x224, T=4): cbp_kernels' model against
the same model in SpikingJelly 2.0 (IF neurons, ATan, detach_reset; its neuron ops choose their
fastest implementation themselves: on CUDA native CUDA > Triton > PyTorch, on CPU its fused
PyTorch kernels, the only ones it has there), run three ways:

- ``spikingjelly``: eager;
- ``spikingjelly_compiled``: ``torch.compile`` of the model (default mode), compiled once per
  batch (the same module at every thread count); compilation and first step run before the
  peak memory and the timing, which see compiled steps only. On CPU (torch 2.13, inductor's
  C++ backend) it compiles as one graph with no graph break, in about 80 s on this project's
  busy 2-core machine;
- ``spikingjelly_memopt<level>``: SpikingJelly 2.0's memory optimizer
  (``activation_based.memopt.optimize_memory``) applied as its own SEW-ResNet builder does
  (``SEWResNet34Builder``): its ``BasicBlock`` modules as targets, its split / chunk rules,
  ``checkpoint_budget="memory"`` (the default), spike compression off for ``cnf="ADD"`` (the
  builder's rule: it decides "binary" from one probe input, and a block input after an ADD
  can hold sums up to 2 on other data, which its 1-bit compressor would lose). Level 1 (selective checkpointing) everywhere; levels 2-4 search splits by measured
  CUDA peak memory, so they run on CUDA only.

Each at batch 1 and 8, on one torch thread and on every core in one run
(CPU), in a group per batch and thread count; samples/s and peak memory per provider
(``bench/report.py`` gives ours against each).

    pytest bench/bench_models.py --benchmark-json=bench/results/<device>/bench_models.json

CPU: 2 timed rounds (a step takes seconds on a small CPU); CUDA: 5. The spikes saved for the
backward are the same values in every model: cbp_kernels stores them at 1 bit (8 for SEW ADD
sums), SpikingJelly at 32.

``test_packed_inference``: inference of packed SEW-ResNet-18 (224x224) and 7B-Net (DVS
128x128), binary weights on every spiking conv, T=4, the fused packed LIF layers
(``LIFConv2d.pack()``: one ``packed_conv2d_lif`` each) against the unfused chain (popcount
conv, float affine, neuron module): samples/s and peak memory.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import device_name, num_threads, peak_memory, run, thread_counts

from cbp_kernels import models
from cbp_kernels.models.interop import load_checkpoint
from peers import spikingjelly_model_zoo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32 if DEVICE == "cuda" else 1  # packed inference
BATCHES = (1, 8)  # training steps (issue 17: batch 1 and 8)
THREADS = thread_counts(DEVICE)
ROUNDS = 5 if DEVICE == "cuda" else 2
T, SIZE, CLASSES = 4, 224, 1000
MEMOPT_LEVELS = (1, 2, 3, 4) if DEVICE == "cuda" else (1,)  # levels 2-4 measure CUDA memory
TRAIN_PROVIDERS = ("cbp_kernels", "spikingjelly", "spikingjelly_compiled",
                   *(f"spikingjelly_memopt{level}" for level in MEMOPT_LEVELS))


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


def _memopt(net, reset, level: int, x: torch.Tensor) -> None:
    """SpikingJelly's ``optimize_memory`` on its SEW-ResNet (in place), as its builder applies it."""
    from spikingjelly.activation_based import memopt

    zoo = spikingjelly_model_zoo().sew_resnet
    memopt.optimize_memory(net, zoo.BasicBlock, lambda model: model(x), level=level, compress=False,
                           split_fn=zoo.SEWResNet34Builder._memopt_split,
                           can_chunk=zoo.SEWResNet34Builder._memopt_can_chunk)
    reset()


def train_model(provider: str, x: torch.Tensor):
    """(the module a training step calls, its reset) for ``provider`` (``TRAIN_PROVIDERS``),
    in training mode on ``x``'s device; every provider holds the same initial weights."""
    torch.manual_seed(0)
    sj_net, sj_reset = _spikingjelly()
    if provider == "cbp_kernels":
        net, reset = _ours(sj_net)
        return net.to(x.device).train(), reset
    sj_net = sj_net.to(x.device).train()
    if provider == "spikingjelly_compiled":
        return torch.compile(sj_net), sj_reset
    if provider.startswith("spikingjelly_memopt"):
        _memopt(sj_net, sj_reset, int(provider.removeprefix("spikingjelly_memopt")), x)
    return sj_net, sj_reset


_COMPILED: dict[int, tuple] = {}  # batch -> torch.compile'd SpikingJelly model and its reset (weights never change)


@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}thr")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
def test_sew_resnet18_train_step(benchmark, provider, batch, threads):
    with num_threads(threads):
        x = torch.rand(T, batch, 3, SIZE, SIZE, device=DEVICE)
        target = torch.randint(0, CLASSES, (batch,), device=DEVICE)
        if provider == "spikingjelly_compiled":  # one compilation per batch, reused at every thread count
            if batch not in _COMPILED:
                _COMPILED.clear()  # the previous batch's model is done: not held through this one's peak
                _COMPILED[batch] = train_model(provider, x)
            net, reset = _COMPILED[batch]
        else:
            net, reset = train_model(provider, x)

        def step():
            loss = F.cross_entropy(net(x).mean(0), target)
            loss.backward()
            reset()
            net.zero_grad(set_to_none=True)

        if provider == "spikingjelly_compiled":
            step()  # compiles (at the first thread count): neither timed nor in the peak memory
        peak = peak_memory(step, DEVICE)
        benchmark.group = f"SEW-ResNet-18 train step, batch {batch}, {threads} thread(s)"
        role = "ours" if provider == "cbp_kernels" else "peer"
        run(benchmark, step, device=DEVICE, rounds=ROUNDS, warmup=1, provider=provider, role=role, batch=batch,
            T=T, image=SIZE, peak_memory_bytes=peak, threads=threads)
        if benchmark.stats:  # None under --benchmark-disable
            benchmark.extra_info.update(samples_per_s=batch / benchmark.stats.stats.mean)


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
