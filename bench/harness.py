"""One benchmark harness for every suite: device naming, synchronised timing, peak memory,
and the measured copy bandwidth that memory-bound kernels are compared with.

Suites call ``run(benchmark, fn, ...)`` from pytest-benchmark tests; results go to the JSON
that ``make bench`` writes and ``bench/report.py`` turns into bench/results/REPORT.md.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time

import torch


def device_name(device: str = "cpu") -> str:
    """A file-system-safe name of the device a suite ran on (used for bench/results/<name>/)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = _cpu_model() or platform.processor() or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(benchmark, fn, *args, device: str = "cpu", rounds: int = 5, warmup: int = 1, setup=None, **extra_info):
    """Times ``fn(*args)`` (synchronised) with pytest-benchmark's pedantic mode; extra_info
    (bytes moved, samples, ...) is stored beside the timing for the report. ``setup()``, if
    given, runs untimed (synchronised) before every call, warm-up calls included."""

    def call():
        # fn's outputs are dropped as the call returns, as a training loop drops a step's
        # activations and gradients before the next step: pytest-benchmark keeps a call's
        # result until the next call has returned, and with them alive each call's outputs took
        # new memory, away from the caches (bench_neuron's bfloat16 [4, 2^20] step, ours, mean of
        # 200 calls: 3.56 -> 3.41 ms on one thread, 2.55 -> 2.49 ms on two, in one process each).
        fn(*args)
        sync(device)

    def prepare():
        setup()
        sync(device)

    prepare = None if setup is None else prepare
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        call()
    benchmark.extra_info.update(extra_info, device=device_name(device))
    return benchmark.pedantic(call, setup=prepare, rounds=rounds, iterations=1)


def thread_counts(device: str = "cpu") -> list[int]:
    """The torch thread counts a CPU suite runs at in one run: one thread and every core this
    process may use (one entry on a one-core machine). On CUDA: torch's setting only."""
    if device.startswith("cuda"):
        return [torch.get_num_threads()]
    return sorted({1, len(os.sched_getaffinity(0))})


@contextlib.contextmanager
def num_threads(n: int):
    """torch runs on ``n`` threads inside the block (the previous count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_bandwidth(nbytes: int = 1 << 28, device: str = "cpu", repeats: int = 5) -> float:
    """Measured bandwidth of a large tensor copy in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def peak_memory(fn, device: str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs (CUDA allocator; on CPU via torch's profiler)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    current = peak = 0
    for ev in sorted(events, key=lambda e: e.time_range.start):
        current += ev.self_cpu_memory_usage  # self: an event's total includes its children's
        peak = max(peak, current)
    return peak
