"""`cbp-quantize`: the command-line main job (issue 7 grows it into run / eval / report).

For now it demonstrates the fused neuron op on this machine: which backends run, and that
every one gives the reference's spikes.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import backends
from .ops import multistep_neuron


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbp-quantize", description=__doc__)
    parser.add_argument("--timesteps", type=int, default=4, help="T of the demo input [T, N]")
    parser.add_argument("--size", type=int, default=1 << 20, help="N of the demo input [T, N]")
    args = parser.parse_args(argv)
    avail = backends()["cpu"]
    print("backends on cpu:", ", ".join(b for b, ok in avail.items() if ok))
    x = torch.randn(args.timesteps, args.size)
    ref, _ = multistep_neuron(x, backend="reference")
    for name in (b for b, ok in avail.items() if ok):
        start = time.perf_counter()
        spikes, _ = multistep_neuron(x, backend=name)
        took = time.perf_counter() - start
        print(f"{name:>10}: {took * 1e3:8.2f} ms, spikes equal to reference: {torch.equal(spikes, ref)}")
    return 0
