"""The multi-step LIF neuron, one training step: forward and backward over all T timesteps
(tau=2, hard reset to 0, ATan surrogate), for T in {4, 16, 32, 64}, float32 and bfloat16.

Shapes: on a GPU the issue's ``[T, 32*64*56*56]`` (a SEW-ResNet stage-1 activation of batch 32);
on a CPU ``[T, 2**20]`` (``CBP_BENCH_NEURON_N`` overrides the column count). Every case runs on
one thread and on every core this process may use, in the same run (``harness.thread_counts``;
the copy bandwidth is measured at each), except the Python loops, on one thread only: on a
small CPU shared with other jobs, two OpenMP threads made them wait on descheduled threads at
each parallel region (~60x slower). Run it on an otherwise idle machine.

Providers (same inputs, same spikes: checked before timing):
- ``ours-<backend>``: ``multistep_neuron`` on each compiled / JIT kernel backend available for
  the device (``cpu``; ``cuda``, ``cupy``, ``triton`` on a GPU);
- ``spikingjelly``: SpikingJelly 2.0's ``LIFNode(step_mode="m")`` with its own automatic choice,
  its fastest available: on CUDA native CUDA > Triton > torch (``SJ_LIF_CUDA_IMPLEMENTATION``
  forces one), on a CPU its torch loop;
- ``naive``: our ``reference`` backend, a Python loop over T of the single-step equations;
- ``compiled``: ``torch.compile`` of that loop (T is unrolled: one graph per T);
- ``spikingjelly-compiled``: ``torch.compile`` of SpikingJelly's ``LIFNode`` (multi-step; its
  torch loop on a CPU), what a user gets with one line.

``spikingjelly`` and both compiled providers are peers: the report's "speed-up vs peer" is
ours against the fastest of them (issue 17: the faster of the two compiled ones).

The op is memory-bound. A fused step needs 5 passes over ``[T, N]`` tensors: the forward
reads X and writes S, the backward reads dL/dS and X (H is recomputed from X, as the ``cpu``
backend does) and writes dL/dX (the [N] state vectors are not counted). ``bytes_moved`` is
that ideal, the same for every provider (the GPU backends save H instead: 7 passes);
``copy_bw_gbs`` the bandwidth of a large tensor copy timed in the case, before its calls
(``COPY_BYTES``), which the report compares with. The [N] state vectors are not counted
either: the default v_init and the unused dL/dV[T-1] reach the kernels as empty tensors (no
pass at all); V[T-1] is written.
On the CPU, outputs of 32 MiB and more are fresh mappings from the allocator on every call,
and this VM's first-touch page faults then cost as much as the kernels (from T = 8 at this
N): PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (huge pages) cuts them ~20x for every provider.
``make bench`` tells glibc to keep freed memory (``GLIBC_TUNABLES`` mmap_max=0, no trim); even
so the heap grew now and then inside a provider's timed calls (fragmentation), and those calls
paid the faults: at T = 16 float32 a call of ours took 56-81 ms instead of 20 (16384-28672
faults), one of ``compiled`` at T = 64 1.6 s instead of 0.27 (131072 faults). Under those
settings the suite therefore first grows the heap once, touched, to what its largest case needs
(``_warm_heap``), so that every provider is timed in the steady state of a training loop; each
case stores its timed calls' page faults in ``extra_info["page_faults"]`` (0-2 when it worked).

    python -m pytest bench/bench_neuron.py --benchmark-json=bench/results/last.json && python bench/report.py
"""
from __future__ import annotations

import os
import resource
import time

import pytest
import torch

import cbp_kernels
from cbp_kernels.ops import multistep_neuron
from cbp_kernels.ops.neuron import reference
from cbp_kernels.ops.neuron.params import NeuronParams
from harness import copy_bandwidth, num_threads, run, sync, thread_counts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_GPU = 32 * 64 * 56 * 56
N_CPU = int(os.environ.get("CBP_BENCH_NEURON_N", 2**20))
N = N_GPU if DEVICE == "cuda" else N_CPU
TS = (4, 16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16)
TAU = 2.0
TENSORS_MOVED = 5  # X, S (forward); dL/dS, X, dL/dX (backward)

# Our kernel backends timed here: the Triton interpreter on CPU tensors is a test tool, not a backend to time.
OURS = [b for b, ok in cbp_kernels.backends()[DEVICE].items() if ok and b != "reference" and (b, DEVICE) != ("triton", "cpu")]


def _ours(backend: str):
    def step(x, grad):
        x = x.detach().requires_grad_()
        spike, _ = multistep_neuron(x, neuron="lif", tau=TAU, v_reset=0.0, surrogate="atan", backend=backend)
        spike.backward(grad)
        return spike, x.grad

    return step


def _compiled():
    p = NeuronParams(v_threshold=1.0, v_reset=0.0, kind=1, surrogate=0, alpha=2.0)
    decay = torch.tensor(1.0 / TAU, device=DEVICE)

    @torch.compile
    def loop(x):
        return reference.forward(x, torch.zeros(x.shape[1:], device=x.device), decay, p)[0]

    def step(x, grad):
        x = x.detach().requires_grad_()
        spike = loop(x)
        spike.backward(grad)
        return spike, x.grad

    return step


def _spikingjelly(compiled: bool = False):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron", reason="spikingjelly 2.0 is the peer")
    from spikingjelly.activation_based import surrogate

    node = sj_neuron.LIFNode(tau=TAU, v_reset=0.0, surrogate_function=surrogate.ATan(), step_mode="m").to(DEVICE)
    call = torch.compile(node) if compiled else node

    def step(x, grad):
        node.reset()
        x = x.detach().requires_grad_()
        spike = call(x)
        spike.backward(grad)
        return spike, x.grad

    return step


def _sj_implementation() -> str:
    """Which implementation SpikingJelly chose (its private selection record; 'auto' if unknown)."""
    if DEVICE == "cpu":
        return "torch (its CPU path)"
    try:
        from spikingjelly._ops.lif import _selection

        chosen = _selection._selections.get(torch.cuda.current_device())
        return getattr(chosen, "name", os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "auto"))
    except (ImportError, AttributeError):
        return os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "auto")


PROVIDERS = {**{f"ours-{b}": (_ours, (b,), "ours") for b in OURS},
             "spikingjelly": (_spikingjelly, (), "peer"),
             "spikingjelly-compiled": (_spikingjelly, (True,), "peer"),
             "naive": (_ours, ("reference",), "baseline"),
             "compiled": (_compiled, (), "peer")}
COMPILED = ("compiled", "spikingjelly-compiled")  # compile in their first calls
# One thread and every core in the same run (harness.thread_counts); the Python loops (seconds
# per call on a CPU) only on one thread: they are baselines, not the peers the target names.
SLOW = ("naive", "spikingjelly")
THREADS = thread_counts(DEVICE)
CASES = [(p, n) for n in THREADS for p in PROVIDERS if n == 1 or DEVICE != "cpu" or p not in SLOW]


# The heap grown once before the cases (under mmap_max=0), in [T, N] float32 tensors of the
# largest T (6 GiB at N = 2^20). Measured (one thread, ours and both compiled peers, both
# dtypes): with 12 of them, fragmentation still grew the heap by 2.5 GiB inside `compiled`'s
# timed calls at T = 64 (65536-131072 faults in 5 of its 7 calls); with 24, no timed call faulted.
HEAP_WARM_BYTES = 24 * max(TS) * N * 4


@pytest.fixture(scope="module", autouse=True)
def _warm_heap():
    """Where glibc keeps freed memory (``make bench``'s mmap_max=0), grows the heap once by
    HEAP_WARM_BYTES and touches it: freed, it stays mapped, so no provider's timed call faults
    in fresh heap pages. A no-op elsewhere (a large block would be its own mapping, unmapped on
    free)."""
    if DEVICE == "cpu" and "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        torch.empty(HEAP_WARM_BYTES, dtype=torch.uint8).fill_(0)


def _with_page_faults(step, counts: list):
    """``step`` that appends the page faults (minor + major, this process) of each call to ``counts``."""

    def counted(x, grad):
        before = resource.getrusage(resource.RUSAGE_SELF)
        out = step(x, grad)
        after = resource.getrusage(resource.RUSAGE_SELF)
        counts.append(after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt)
        return out

    return counted


def _inputs(T: int, n: int = N, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(T, n, generator=gen) * 1.5 + 0.4).to(DEVICE, dtype)
    grad = torch.randn(T, n, generator=gen).to(DEVICE, dtype)
    return x, grad


# The copy bandwidth of each case is timed in the case, before its calls (GB/s; best of 5
# copies of 128 MiB, 256 MiB on a GPU): the VM's memory bandwidth drifts while the suite runs
# (2026-12-07: 11.1-14.0 GB/s on one thread within an hour; in one full run every provider's
# float32 T = 64 case took 1.3-1.4x its time of the run before, the bandwidth timed once at the
# suite's start unchanged), and a case is compared with the bandwidth of its own minutes.
COPY_BYTES = 1 << 28 if DEVICE == "cuda" else 1 << 27


def test_providers_agree():
    x, grad = _inputs(5, 4099)
    ref_spike, ref_grad = _ours("reference")(x, grad)
    for name, (make, args, _) in PROVIDERS.items():
        spike, gx = make(*args)(x, grad)
        assert torch.equal(spike, ref_spike), f"{name}: spikes differ from the reference"
        torch.testing.assert_close(gx, ref_grad, atol=1e-5, rtol=1e-4, msg=f"{name}: grad x")


# Timed calls per case: about TIMED_SECONDS of calls, MIN_ROUNDS to MAX_ROUNDS, the same rule for
# every provider. With a fixed 7, one descheduled call moved a few-ms case's mean by a fifth on this
# 2-vCPU VM (2026-12-07, ours bfloat16 T = 4 on two threads: six calls of 2.1-2.5 ms and one of 6.3).
TIMED_SECONDS, MIN_ROUNDS, MAX_ROUNDS = 1.0, 7, 50


def _rounds(step, x, grad) -> int:
    """The timed calls of a case whose warm-up is done: one more (synchronised) call measures it."""
    start = time.perf_counter()
    step(x, grad)
    sync(DEVICE)
    return max(MIN_ROUNDS, min(MAX_ROUNDS, round(TIMED_SECONDS / (time.perf_counter() - start))))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("provider, threads", CASES, ids=[f"{p}-{n}thr" for p, n in CASES])
def test_neuron_fwd_bwd(benchmark, provider, threads, T, dtype):
    make, args, role = PROVIDERS[provider]
    faults: list[int] = []
    step = _with_page_faults(make(*args), faults)
    x, grad = _inputs(T, dtype=dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"neuron LIF fwd+bwd [T={T}, N={N}] {dtype_name} {DEVICE}, {threads} thread(s)"
    slow = provider in SLOW and DEVICE == "cpu"  # the Python loops take seconds per call on a CPU
    with num_threads(threads):
        copy_bw = copy_bandwidth(COPY_BYTES, device=DEVICE)  # before the warm-up: the calls find x in cache
        # torch.compile compiles in its first call(s): two warm-ups keep that out of the timing.
        for _ in range(2 if provider in COMPILED else 1):
            step(x, grad)
        rounds = 3 if slow else _rounds(step, x, grad)
        run(benchmark, step, x, grad, device=DEVICE, rounds=rounds, warmup=0,
            provider=provider, role=role, T=T, N=N, dtype=dtype_name,
            bytes_moved=TENSORS_MOVED * T * N * x.element_size(), copy_bw_gbs=copy_bw,
            load_avg_1min=os.getloadavg()[0], threads=threads,
            **({"sj_implementation": _sj_implementation()} if provider == "spikingjelly" else {}))
    # the timed calls' page faults (extra_info is stored after the run, so it can hold them)
    benchmark.extra_info["page_faults"] = faults[-rounds:]
