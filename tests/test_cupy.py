"""The `cupy` backends' launches, checked without a GPU: each backend runs on CPU tensors
through a stand-in CuPy that records what ``ops/_cupy.py`` hands each kernel, and the
self-contained source it would give NVRTC is compiled to PTX by nvcc (NVRTC's stand-in, same
options): every kernel launched must be there, taking as many parameters, of the same PTX
types, as the backend passes (a changed kernel signature left unmatched in a cupy.py fails)."""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from cbp_kernels.ops import _cupy
from cbp_kernels.ops._cuda_source import cuda_source

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH (the CUDA toolkit; CI has it)")


@pytest.fixture
def launches(monkeypatch):
    """{(op, kernel name): [args of each launch]} recorded through a stand-in CuPy."""
    recorded: dict[tuple[str, str], list[tuple]] = {}

    class Module:
        def __init__(self, code, options):
            self.op = next(op for op in ("bitpack", "bitconv", "constraint", "neuron", "sigmoid_quant")
                           if code == cuda_source(op))

        def get_function(self, name):
            return lambda grid, block, args, shared_mem=0: recorded.setdefault((self.op, name), []).append(args)

    fake = types.ModuleType("cupy")
    fake.RawModule = Module
    fake.from_dlpack = lambda t: t
    fake.cuda = types.SimpleNamespace(Device=lambda i: contextlib.nullcontext(),
                                      ExternalStream=lambda ptr, i: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _cupy._kernel.cache_clear()
    yield recorded
    _cupy._kernel.cache_clear()


def _ptx_type(arg) -> str:
    """The PTX parameter type of one argument as _cupy.launch passes it."""
    if isinstance(arg, torch.Tensor):
        return "u64"  # a device pointer
    if isinstance(arg, np.void):
        return f"b8[{arg.dtype.itemsize}]"  # a struct by value
    return {np.uint64: "u64", np.int64: "u64", np.int32: "u32", np.float32: "f32", np.float64: "f64"}[type(arg)]


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """op -> the PTX (sm_80) of the source the cupy backend hands NVRTC."""
    cache: dict[str, str] = {}

    def compile_op(op: str) -> str:
        if op not in cache:
            src = tmp_path_factory.mktemp(op) / f"{op}_rtc.cu"
            src.write_text(cuda_source(op))
            out = src.with_suffix(".ptx")
            subprocess.run([shutil.which("nvcc"), *_cupy.NVRTC_OPTIONS, "-arch=sm_80", "-ptx", str(src), "-o", str(out)],
                           check=True)
            cache[op] = out.read_text()
        return cache[op]

    return compile_op


def _params(ptx_text: str, name: str) -> list[str]:
    entry = re.search(rf"\.entry {name}\((.*?)\)", ptx_text, re.S)
    assert entry, f"kernel {name} is not in the source the cupy backend compiles"
    types_ = []
    for line in entry.group(1).split(","):
        m = re.search(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+\w+(\[\d+\])?", line)
        types_.append(m.group(1) + (m.group(2) or ""))
    return types_


def _run_every_cupy_backend():
    """Each cupy backend's entry points once, on small CPU tensors (every launch path)."""
    from cbp_kernels.ops.bitconv import cupy as bitconv
    from cbp_kernels.ops.bitpack import cupy as bitpack
    from cbp_kernels.ops.constraint import cupy as constraint
    from cbp_kernels.ops.neuron import cupy as neuron
    from cbp_kernels.ops.neuron.params import NeuronParams
    from cbp_kernels.ops.sigmoid_quant import cupy as sigmoid_quant

    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                  torch.bfloat16, torch.float32, torch.float64):
        x = torch.zeros(2, 5, 3, dtype=dtype).transpose(1, 2)  # [B, R, C] strided
        bitpack.pack(x)
    bitpack.unpack(torch.zeros(3, 2, dtype=torch.int32), 40, torch.float32)

    xp = torch.zeros(2, 4, 4, 1, dtype=torch.int32)
    planes = torch.zeros(2, 8, 3, 3, 1, dtype=torch.int32)
    bitconv.conv2d(xp, planes, 0.5, torch.zeros(8), [1, 1], [1, 1], [1, 1], 1)
    bitconv.conv2d(xp, planes, 0.5, None, [1, 1], [1, 1], [1, 1], 1)
    bitconv.conv2d_lif(xp, planes, torch.ones(8), torch.zeros(8), [1, 1], [1, 1], [1, 1], 1, 2, 0.5, NeuronParams())

    w = [torch.randn(5), torch.randn(3, 2)]
    table = torch.zeros(2, 4, 3)
    constraint.constraint_pass(w, [torch.ones_like(t) for t in w], table, [torch.zeros_like(t) for t in w], [])
    constraint.multiplier_step(w, *([torch.zeros_like(t) for t in w] for _ in range(3)), table, torch.zeros(8))
    constraint.quantize(w[0], table[:1])

    p = NeuronParams(v_reset=None, surrogate=1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 5).to(dtype)
        k = torch.tensor(0.5)
        s, v, h = neuron.forward(x, torch.empty(0), k, p)
        for need_grad_decay in (False, True):
            neuron.backward(s, torch.empty(0), h, s, x, torch.zeros(5), k, p, need_grad_decay)

        wq = torch.randn(7).to(dtype)
        one = torch.ones(())
        sigmoid_quant.forward(wq, one, one, torch.ones(2), torch.tensor([-0.5, 0.5]), 1.0, 3.0)
        sigmoid_quant.backward(torch.ones_like(wq), wq, one, one, torch.ones(2), torch.tensor([-0.5, 0.5]), 1.0, 3.0)


@needs_nvcc
def test_cupy_launches_match_the_kernels(launches, ptx):
    _run_every_cupy_backend()
    for op in ("bitpack", "bitconv", "constraint", "neuron", "sigmoid_quant"):
        assert any(key[0] == op for key in launches), f"no {op} kernel was launched"
    for (op, name), calls in sorted(launches.items()):
        expected = _params(ptx(op), name)
        for args in calls:
            passed = [_ptx_type(a) for a in args]
            assert passed == expected, f"{op}.{name}: the cupy backend passes {passed}, the kernel takes {expected}"


def test_bitpack_cupy_passes_the_strides_and_a_zeroed_count(launches):
    """The strided [B, R, C] view goes to the kernel as it is (no copy), with its strides."""
    from cbp_kernels.ops.bitpack import cupy as bitpack

    x = torch.zeros(2, 3, 40).transpose(0, 1)  # [3, 2, 40], strides (40, 120, 1)
    words, non_binary = bitpack.pack(x)
    (args,) = launches[("bitpack", "bitpack_f32")]
    assert args[0].data_ptr() == x.data_ptr() and [int(a) for a in args[1:8]] == [3, 2, 40, *x.stride(), 2]
    assert args[8] is words and words.shape == (3, 2, 2) and args[9] is non_binary and int(non_binary) == 0


@needs_nvcc
@pytest.mark.parametrize("op", ["bitpack", "bitconv", "constraint", "neuron", "sigmoid_quant"])
def test_bitwise_kernels_compile_without_fma_or_approximations(ptx, op):
    """The kernels round as the CPU ones (and as the references where those are bit-exact):
    with NVRTC_OPTIONS their PTX has no fused multiply-add and no approximate instruction
    (division and sqrt round to nearest; e^x is common/exp_math.h's, not CUDA's expf, which
    is built from fma and ex2.approx)."""
    text = ptx(op)
    assert not re.findall(r"\bfma\.\S+", text), f"{op}: fused multiply-adds in the PTX"
    assert not re.findall(r"\.approx\b\S*", text), f"{op}: approximate instructions in the PTX"
    assert not re.findall(r"\b(?:div|sqrt|rcp)\.(?:full|approx)", text)
