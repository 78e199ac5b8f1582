"""Every Triton kernel, compiled ahead of time for sm_80 and sm_90 without a GPU, and its PTX read.

The tests elsewhere run the Triton kernels under ``TRITON_INTERPRET=1``, which skips the
compiler: a kernel that does not compile, or that compiles to other arithmetic than the
interpreter runs, would first show on a GPU. Here the launches come from the ops themselves:
``LAUNCHES`` calls every public op with ``backend="triton"`` on small CPU tensors, over the
configurations that select each constexpr value, with Triton's JIT launch replaced by a
recorder. Each distinct recorded launch (kernel, argument types, constexprs, compile options)
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))``
and its PTX must hold no FMA outside libdevice's expf, no approximate division, no
``tl.exp`` (``ex2.approx.f32`` without libdevice's range reduction) and no atomics; every
grid must be 1-D (grid.y stops at 65535).

The compiler needs a process without ``TRITON_INTERPRET`` (it is read when a kernel is
defined), so the test runs this file as a script in a fresh process, with a fresh Triton
cache (nothing is reused across runs).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

TARGETS = (80, 90)
HERE = os.path.dirname(os.path.abspath(__file__))


def _triton_has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _triton_has_nvidia_backend(), reason="needs triton with its NVIDIA backend (the PyPI wheel)")
def test_every_triton_launch_compiles_for_sm80_and_sm90_without_fma_approx_or_atomics(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=os.path.dirname(HERE),
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(proc.stdout)


# ---- the launches: every op, backend="triton", each constexpr value at least once per dtype --

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _neuron_launches():
    """Forward: every (IF | LIF, hard | soft reset, decay_input, v_init given) per dtype;
    backward: every surrogate twice per dtype, cycling detach_reset, PLIF (dL/dk) and dL/dV[T-1]."""
    from cbp_kernels.ops import multistep_neuron
    from cbp_kernels.ops.neuron import SURROGATES

    forward = [(n, vr, di, v0) for n in ("if", "lif") for vr in (0.0, None) for di in ((True,) if n == "if" else
                                                                                         (True, False))
               for v0 in (False, True)]
    surrogates = list(SURROGATES)
    for dtype in DTYPES:
        for i, (neuron, v_reset, decay_input, with_v0) in enumerate(forward):
            x = torch.randn(3, 5).to(dtype).requires_grad_()
            v0 = torch.zeros(5, requires_grad=True) if with_v0 else None
            plif = neuron == "lif" and i % 2 == 1
            kw = dict(tau=torch.tensor(2.0, requires_grad=True)) if plif else {}
            s, v = multistep_neuron(x, v0, neuron="plif" if plif else neuron, v_reset=v_reset,
                                    decay_input=decay_input, detach_reset=i % 3 == 0,
                                    surrogate=surrogates[i % len(surrogates)], backend="triton", **kw)
            (s.float().sum() + (v.sum() if i % 4 < 2 else 0)).backward()


def _constraint_launches():
    """Per dtype and level count K (2, 3, 4): the pass (cycling its optional outputs), quantize
    and the multiplier step."""
    from cbp_kernels.ops import constraint_pass, multiplier_step, quantize

    outputs = [(False, False), (True, False), (False, True), (True, True)]
    for d, dtype in enumerate(DTYPES):
        for k, levels in enumerate(([-1.0, 1.0], [-1.0, 0.0, 1.0], [-2.0, -1.0, 0.0, 1.0])):
            w = [torch.randn(40).to(dtype), torch.randn(3, 7).to(dtype)]
            lam = [torch.rand_like(t) for t in w]
            lv, scales = torch.tensor(levels), torch.tensor([0.5, 0.25])
            grad, lgrad = outputs[(d + k) % len(outputs)]
            constraint_pass(w, lam, lv, scales, 2.0, grads=[torch.zeros_like(t) for t in w] if grad else None,
                            lambda_grads=[torch.zeros_like(t) for t in w] if lgrad else None, backend="triton")
            quantize(w[0], lv, scales[0], backend="triton")
            multiplier_step(w, lam, [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w], lv, scales,
                            2.0, step=1, lr=0.1, backend="triton")


def _sigmoid_quant_launches():
    """Forward and backward per dtype and sigmoid count (binary, ternary, 2-bit levels)."""
    from cbp_kernels.ops.sigmoid_quant import sigmoid_quantize

    for dtype in DTYPES:
        for levels in ([-1.0, 1.0], [-1.0, 0.0, 1.0], [-3.0, -1.0, 1.0, 3.0]):
            w = torch.randn(50).to(dtype).requires_grad_()
            alpha, beta = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
            sigmoid_quantize(w, alpha, beta, levels, 5.0, backend="triton").float().sum().backward()


def _bitconv_launches():
    """bitpack / bitunpack of every storage dtype; the conv binary / ternary with and without
    bias; the fused epilogue for IF / LIF, hard / soft reset, decay_input, binary / ternary."""
    from cbp_kernels.ops import bitpack, bitunpack, pack_spikes, pack_weight, packed_conv2d, packed_conv2d_lif

    for dtype in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        bitpack((torch.rand(3, 40) < 0.5).to(dtype), backend="triton")
    bitunpack(torch.zeros(3, 2, dtype=torch.int32), -1, 40, backend="triton")
    T, N, C, O = 2, 1, 32, 32
    x = pack_spikes((torch.rand(T * N, 5, 5, C) < 0.5).float(), backend="cpu")
    for ternary in (False, True):
        q = torch.randint(-1, 2, (O, C, 3, 3)).float() if ternary else torch.randint(0, 2, (O, C, 3, 3)).float() * 2 - 1
        w = pack_weight(q * 0.5, "ternary" if ternary else "binary", 0.5)
        packed_conv2d(x, w, torch.zeros(O) if ternary else None, padding=1, backend="triton")
        packed_conv2d(x, w, None if ternary else torch.zeros(O), padding=1, backend="triton")
        for neuron, v_reset, decay_input in (("if", 0.0, True), ("lif", None, True), ("lif", 0.0, False)):
            packed_conv2d_lif(x, w, T, padding=1, neuron=neuron, v_reset=v_reset, decay_input=decay_input,
                              backend="triton")


LAUNCHES = (_neuron_launches, _constraint_launches, _sigmoid_quant_launches, _bitconv_launches)


# ---- recording, compiling, reading the PTX (in the script process) --------------------------

def _record() -> list[tuple]:
    """Runs ``LAUNCHES`` with the triton backend usable on CPU tensors and every JIT launch
    recorded instead of run: ``[(kernel, signature, constexprs, options)]``, distinct."""
    from triton.runtime.jit import JITFunction, mangle_type

    from cbp_kernels.ops import _backend

    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        assert len(grid) == 1, f"{self.__name__}: grid {grid} is not 1-D (grid.y stops at 65535)"
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        sig, constexprs = {}, {}
        for p in self.params:
            value = bound.get(p.name, p.default)
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                constexprs[p.name] = value
            else:
                sig[p.name] = mangle_type(value)
                if sig[p.name] == "constexpr":  # None
                    constexprs[p.name] = value
        key = (self, tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
        launches.setdefault(key, (self, sig, constexprs, options))

    _backend._triton_usable = lambda device: True
    JITFunction.run = record
    for launch in LAUNCHES:
        launch()
    return list(launches.values())


def _ptx_problems(ptx: str) -> list[str]:
    """What the PTX must not hold: approximate division, atomics, tl.exp's bare ex2, and FMA
    beyond the 2 that each libdevice expf does (its range reduction x*log2e in two parts)."""
    count = {op: len(re.findall(rf"^\s*(?:@!?%\w+\s+)?{re.escape(op)}", ptx, re.M))  # (predicated) instructions
             for op in ("div.full", "div.approx", "rcp.approx", "atom.", "red.", "ex2.approx.f32", "ex2.approx.ftz.f32",
                        "fma.rn.f32")}
    problems = [f"{count[op]} {op}" for op in ("div.full", "div.approx", "rcp.approx", "atom.", "red.") if count[op]]
    if count["ex2.approx.f32"]:
        problems.append(f"{count['ex2.approx.f32']} ex2.approx.f32 (tl.exp, not libdevice's expf)")
    expf, fma = count["ex2.approx.ftz.f32"], count["fma.rn.f32"]
    if fma > 2 * expf:
        problems.append(f"{fma} fma.rn.f32 for {expf} libdevice expf (FMA contraction)")
    return problems


_LAUNCHES: list[tuple] = []  # the recorded launches, inherited by the forked compilers


def _compile(job: tuple[int, int]) -> list[str]:
    """Compiles recorded launch ``job[0]`` for sm_``job[1]``; the problems its PTX shows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, sig, constexprs, options = _LAUNCHES[job[0]]
    src = ASTSource(kernel, sig, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", job[1], 32), options=options).asm["ptx"]
    types = sorted({t for t in sig.values() if t.startswith("*")})
    return [f"{kernel.__name__} sm_{job[1]} {constexprs} {types}: {problem}" for problem in _ptx_problems(ptx)]


def main() -> None:
    import multiprocessing

    start = time.perf_counter()
    _LAUNCHES[:] = _record()
    recorded = time.perf_counter()
    jobs = [(i, arch) for i in range(len(_LAUNCHES)) for arch in TARGETS]
    # forked workers (the recorded kernels are not picklable), one per core
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 16)) as pool:
        failures = [f for problems in pool.imap_unordered(_compile, jobs) for f in problems]
    per_kernel = Counter(kernel.__name__ for kernel, *_ in _LAUNCHES)
    print(f"{len(_LAUNCHES)} launches x {len(TARGETS)} targets compiled in {time.perf_counter() - recorded:.1f} s "
          f"on {os.cpu_count()} cores (recorded in {recorded - start:.1f} s): {dict(per_kernel)}")
    assert not failures, "\n".join(sorted(failures))


if __name__ == "__main__":
    main()
