"""The CUDA kernels (csrc/cuda/*.cuh) executed on this CPU: host-emulated (csrc/emu/cuda_emu.h,
cbp_kernels/ops/_cuda_emu.py) from exactly the text that the `cupy` backends hand NVRTC, and
driven by the cupy backends' own Python code (ops/<op>/cupy.py: argument marshalling, grid
sizes), the emulator standing in for ``_cupy.launch``. Each kernel is checked against its op's
reference at odd sizes: bit for bit where the CPU kernels are, else within a tolerance (named
at each check: the host's expf is not the device's, float32 block sums run in another order).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import itertools
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cbp_kernels._C  # noqa: F401  (the CPU kernels, the bitwise oracle of the backward passes)
from cbp_kernels.ops import _cuda_emu, _cupy
from cbp_kernels.ops._cuda_source import cuda_source
from cbp_kernels.ops.bitconv import cupy as bitconv_cupy
from cbp_kernels.ops.bitconv import reference as bitconv_ref
from cbp_kernels.ops.bitconv.weight import pack_weight
from cbp_kernels.ops.bitpack import cupy as bitpack_cupy
from cbp_kernels.ops.bitpack import reference as bitpack_ref
from cbp_kernels.ops.constraint import compiled as constraint_cpu
from cbp_kernels.ops.constraint import cupy as constraint_cupy
from cbp_kernels.ops.constraint import reference as constraint_ref
from cbp_kernels.ops.neuron import compiled as neuron_cpu
from cbp_kernels.ops.neuron import cupy as neuron_cupy
from cbp_kernels.ops.neuron import reference as neuron_ref
from cbp_kernels.ops.neuron.params import NEURONS, SURROGATES, DEFAULT_ALPHA, NeuronParams
from cbp_kernels.ops.sigmoid_quant import cupy as sigmoid_cupy
from cbp_kernels.ops.sigmoid_quant import reference as sigmoid_ref

from conftest import GRAD_TOL, assert_close

pytestmark = pytest.mark.skipif(shutil.which(_cuda_emu._cxx()) is None,
                                reason="the CUDA host emulation needs a C++20 compiler ($CXX or g++ on PATH)")

OPS = ("neuron", "constraint", "sigmoid_quant", "bitpack", "bitconv")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def emulated_cupy():
    """Every ops/<op>/cupy.py launches through the host emulation instead of CuPy."""
    with pytest.MonkeyPatch.context() as mp:
        for op in ("neuron", "constraint", "sigmoid_quant", "bitpack", "bitconv"):
            module = importlib.import_module(f"cbp_kernels.ops.{op}.cupy")
            for name, value in vars(module).items():
                if value is _cupy.launch:
                    mp.setattr(module, name, _cuda_emu.launch)
        mp.setattr(_cupy, "launch", _cuda_emu.launch)  # what _cupy.launch_items calls
        yield


# --- the emulation itself ---------------------------------------------------------------------

def test_host_build_compiles_the_source_cupy_hands_nvrtc(monkeypatch):
    """What the cupy backend compiles (recorded by a stand-in CuPy) is, byte for byte, what the
    host library was built from (its SHA-256 compiled in), for every kernel the backends use."""
    compiled = {}

    class RawModule:
        def __init__(self, code, options):
            self.code = code

        def get_function(self, name):
            compiled[name] = self.code

    class Device:
        def __init__(self, index):
            pass

        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None

    fake = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_cupy, "_nvrtc_options", lambda: _cupy.NVRTC_OPTIONS)
    for op in OPS:
        lib = _cuda_emu.kernels(op)
        assert lib.params, op
        for name in lib.params:
            _cupy._kernel.__wrapped__(op, name, 0)
            assert hashlib.sha256(compiled.pop(name).encode()).hexdigest() == lib.source_sha256, (op, name)


# Kernels that exercise the emulation's rules (a GPU's): warp shuffles, shared memory across
# warps, barriers; a deadlock and a shuffle with an exited lane are errors, not hangs.
_RULES = r"""
extern "C" __global__ void shuffles(int* out) {
  __shared__ int per_warp[8];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int down = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 3);
  const int xr = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 5);
  const int from = __shfl_sync(0xffffffffu, (int)threadIdx.x * 10, 31 - lane);
  int solo = (int)threadIdx.x;  // lane 31 takes a collective of its own first
  if (lane == 31) solo = __shfl_sync(0x80000000u, solo * 2, 31);
  const int halves = lane < 16 ? __shfl_xor_sync(0x0000ffffu, solo, 1) : __shfl_xor_sync(0xffff0000u, solo, 2);
  if (lane == 0) per_warp[warp] = (int)blockIdx.x;
  __syncthreads();
  const int other = per_warp[(warp + 1) % (blockDim.x / 32)];
  const int i = 5 * (blockIdx.x * blockDim.x + threadIdx.x);
  out[i] = down; out[i + 1] = xr; out[i + 2] = from; out[i + 3] = other; out[i + 4] = halves;
}
extern "C" __global__ void votes(int* out) {
  const int lane = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  const int any = __any_sync(0xffffffffu, lane == 7), all = __all_sync(0xffffffffu, lane < 31);
  __syncwarp();
  const int up = __shfl_up_sync(0xffffffffu, lane, 2);
  const int i = 5 * threadIdx.x;
  out[i] = (int)ballot; out[i + 1] = any; out[i + 2] = all; out[i + 3] = up;
  out[i + 4] = __float_as_int(__fdiv_rn(1.0f, (float)(lane + 3)));
}
extern "C" __global__ void deadlock(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
extern "C" __global__ void past_end(int* out) { out[threadIdx.x] = 1; }
struct Pair { long long a, b; };
extern "C" __global__ void params(int* out, long long n, float f, int k, Pair p) {
  if (threadIdx.x < n) out[threadIdx.x] = (int)(f * k) + (int)(p.a * p.b);
}
extern "C" __global__ void exited_lane(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 1);
}
"""


def test_emulation_runs_blocks_as_a_gpu():
    """Shuffles read the named lane (their own value past the warp's end; two halves of a warp
    with disjoint masks each among themselves, one lane after a collective of its own), shared
    memory written by one warp is read by another after __syncthreads, blockIdx / blockDim are
    the launch's."""
    lib = _cuda_emu.library("rules", _RULES)
    out = torch.full((2 * 96 * 5,), -1, dtype=torch.int32)
    lib("shuffles", 2, 96, (out,))
    t = torch.arange(2 * 96)
    tid, lane, block = t % 96, t % 32, t // 96
    want = torch.stack([torch.where(lane + 3 < 32, tid + 3, tid), tid ^ 5, (tid - lane + 31 - lane) * 10, block,
                        torch.where(lane < 16, tid ^ 1, torch.where(lane == 29, 2 * (tid ^ 2), tid ^ 2))], 1)
    assert torch.equal(out.view(-1, 5), want.int())


def test_emulation_votes_and_intrinsics():
    """__ballot_sync / __any_sync / __all_sync / __syncwarp / __shfl_up_sync and __fdiv_rn."""
    out = torch.zeros(64 * 5, dtype=torch.int32)
    _cuda_emu.library("rules", _RULES)("votes", 1, 64, (out,))
    lane = torch.arange(64) % 32
    ballot = int(sum(1 << l for l in range(0, 32, 3)))
    ones = torch.ones(64, dtype=torch.int64)
    want = torch.stack([ones * (ballot - (1 << 32) if ballot >= 1 << 31 else ballot), ones, ones * 0,
                        torch.where(lane >= 2, lane - 2, lane), (1.0 / (lane + 3).float()).view(torch.int32).long()], 1)
    assert torch.equal(out.view(-1, 5), want.int())


@pytest.mark.parametrize("kernel, size, match", [("deadlock", 64, "deadlock in block"),
                                                 ("exited_lane", 64, "lane 5 has exited"),
                                                 ("past_end", 63, r"wrote after a \(63,\) torch.int32 argument")])
def test_emulation_reports_kernel_errors(kernel, size, match):
    """A deadlock, a shuffle naming an exited lane, a write past a tensor's end: errors."""
    lib = _cuda_emu.library("rules", _RULES)
    with pytest.raises(RuntimeError, match=match):
        lib(kernel, 1, 64, (torch.zeros(size, dtype=torch.int32),))


def test_marshalling_checks_the_kernel_parameter_types():
    """Arguments are checked against the C++ parameters (as CuPy does not): count, kind, size;
    a NumPy structured scalar passes a struct by value, numpy.uint64(0) a null pointer."""
    lib = _cuda_emu.library("rules", _RULES)
    out = torch.zeros(8, dtype=torch.int32)
    pair = np.array((3, 5), dtype=[("a", np.int64), ("b", np.int64)])[()]
    good = (out, np.int64(8), np.float32(2.5), np.int32(4), pair)
    lib("params", 1, 32, good)
    assert torch.equal(out, torch.full((8,), 10 + 15, dtype=torch.int32))
    for bad, match in [(good[:-1], "4 arguments for 5"), ((out, np.int32(8)) + good[2:], r"int32 \(i4\).*i8"),
                       ((out, np.int64(8), np.float64(2.5)) + good[3:], "f8.*f4"),
                       ((np.int64(0),) + good[1:], "i8.*p8"),
                       ((out, 8) + good[2:], "int is not"), (good[:-1] + (np.int64(3),), "i8.*s16")]:
        with pytest.raises(TypeError, match=match):
            lib("params", 1, 32, bad)
    with pytest.raises(TypeError, match="null pointer, the parameter is i8"):
        lib("params", 1, 32, (out, None) + good[2:])


def _conversions():
    lib = _cuda_emu.library("rules", _RULES).lib
    for name in ("cbp_emu_f32_to_f16", "cbp_emu_f16_to_f32", "cbp_emu_f32_to_bf16", "cbp_emu_bf16_to_f32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return lib


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_storage_conversions_round_to_nearest_even_as_torch(dtype):
    """__half / __nv_bfloat16 of the emulation: every 16-bit pattern decodes as torch's, and
    floats (the midpoints between neighbours, either side of them, subnormals, overflow) round
    as torch's (round to nearest even); NaN stays NaN."""
    lib, tag = _conversions(), "f16" if dtype == torch.float16 else "bf16"
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    decoded = torch.empty(every.numel(), dtype=torch.float32)
    getattr(lib, f"cbp_emu_{tag}_to_f32")(every.data_ptr(), decoded.data_ptr(), every.numel())
    expect = every.view(dtype).float()
    assert torch.equal(decoded.isnan(), expect.isnan())
    assert torch.equal(decoded[~expect.isnan()].view(torch.int32), expect[~expect.isnan()].view(torch.int32))
    finite = expect[expect.isfinite()].double().unique()
    mids = ((finite[1:] + finite[:-1]) / 2).float()
    up, down = torch.full_like(mids, 1e30), torch.full_like(mids, -1e30)
    x = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
                   torch.randn(20000) * torch.logspace(-40, 38, 20000),
                   torch.tensor([65504.0, 65519.0, 65520.0, 1e6, -1e-30, 3e38, *map(float, ("inf", "-inf", "nan"))])])
    bits = torch.empty(x.numel(), dtype=torch.int16)
    getattr(lib, f"cbp_emu_f32_to_{tag}")(x.data_ptr(), bits.data_ptr(), x.numel())
    expect = x.to(dtype)
    got = bits.view(dtype)
    assert torch.equal(got.isnan(), expect.isnan())
    ok = ~expect.isnan()
    wrong = (got[ok].view(torch.int16) != expect[ok].view(torch.int16)).nonzero()
    assert wrong.numel() == 0, f"{wrong.numel()} values round differently, first {x[ok][wrong[0]].item()!r}"


# --- neuron -----------------------------------------------------------------------------------

def _neuron_cases():
    """Every surrogate x neuron x dtype; reset, decay_input, detach_reset, v_init and
    grad_v_last each vary over the cases."""
    for i, (surrogate, neuron, dtype) in enumerate(itertools.product(SURROGATES, NEURONS, DTYPES)):
        yield pytest.param(surrogate, neuron, dtype, i, id=f"{surrogate}-{neuron}-{str(dtype)[6:]}-{i}")


def _neuron_inputs(neuron, surrogate, dtype, i):
    soft, decay_input, detach = i % 2 == 1, i % 3 != 0, i % 5 == 0
    p = NeuronParams(v_threshold=0.6, v_reset=None if soft else -0.1, kind=NEURONS[neuron], decay_input=decay_input,
                     detach_reset=detach, surrogate=SURROGATES[surrogate], alpha=DEFAULT_ALPHA[surrogate] * 1.3)
    T, shape = (5, (3, 37)) if i % 2 else (7, (300,))  # N = 111 (one block), 300 (two, a tail)
    x = (torch.randn(T, *shape) * 0.8 + 0.3).to(dtype)
    v_init = torch.randn(shape) * 0.2 if i % 4 < 2 else torch.empty(0)
    decay = torch.tensor(1 / 1.7)
    return p, x, v_init, decay


@pytest.mark.parametrize("surrogate, neuron, dtype, i", list(_neuron_cases()))
def test_neuron_kernels(surrogate, neuron, dtype, i):
    """neuron_forward_*: spikes, H and v_last bit for bit the reference's in every dtype.
    neuron_backward_* in float32: grad_x and grad_v_init bit for bit the CPU kernel's, except
    through expf (Sigmoid surrogate: the host's expf vs the CPU kernel's polynomial: GRAD_TOL);
    PLIF's grad_decay within 1e-5 relative (float32 block sums, in another order). With 16-bit
    storage the backward reads the stored H, rounded (the reference and the CPU kernel replay H
    in float32, so near a surrogate's kink they differ by more than any tolerance): bit for bit
    the float32 kernel's on the same values, its grad_x rounded to the storage dtype."""
    p, x, v_init, decay = _neuron_inputs(neuron, surrogate, dtype, i)
    spike, v_last, h = neuron_cupy.forward(x, v_init, decay, p)
    r_spike, r_v_last, r_h = neuron_ref.forward(x, v_init if v_init.numel() else torch.full(x.shape[1:], p.reset_value),
                                                decay, p)
    assert spike.dtype == dtype and torch.equal(spike, r_spike.to(dtype))
    assert torch.equal(h, r_h.to(dtype)) and torch.equal(v_last, r_v_last.float())

    grad_spike = torch.randn(x.shape).to(dtype)
    grad_v_last = torch.randn(x.shape[1:]) if i % 3 == 1 else torch.empty(0)
    need_grad_decay = neuron == "plif"
    args = (grad_spike, grad_v_last, h, spike, x, v_init, decay, p, need_grad_decay)
    gx, gv, gk = neuron_cupy.backward(*args)
    if dtype == torch.float32:
        c_gx, c_gv, c_gk = neuron_cpu.backward(*args)
        if surrogate == "sigmoid":
            assert_close(gx, c_gx, *GRAD_TOL[dtype], "grad_x")
            assert_close(gv, c_gv, *GRAD_TOL[dtype], "grad_v_init")
        else:
            assert torch.equal(gx, c_gx) and torch.equal(gv, c_gv)
        if need_grad_decay:
            assert_close(gk, c_gk, 1e-4 * float(c_gk.abs().clamp(min=1)), 1e-5, "grad_decay")
    else:  # float32 math on the loaded values: the float32 kernel's on the same values, rounded
        f32 = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        e_gx, e_gv, e_gk = neuron_cupy.backward(*f32)
        assert torch.equal(gx, e_gx.to(dtype)) and torch.equal(gv, e_gv) and torch.equal(gk, e_gk)


# --- constraint -------------------------------------------------------------------------------

LAYERS = [(1,), (31,), (4097,), (3, 5, 7), (9000,)]  # chunks of 4096: tails, one layer over 3 chunks


def _constraint_layers(dtype, levels=(-1.0, 0.0, 1.0), g=3.0):
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(len(LAYERS), generator=gen) * 0.5 + 0.05
    weights = [(torch.randn(s, generator=gen) * sc * 1.3).to(dtype) for s, sc in zip(LAYERS, scales)]
    for w, sc in zip(weights, scales):  # weights on levels, midpoints and window edges too
        flat, lv = w.view(-1), torch.tensor(levels) * sc
        special = torch.cat([lv, (lv[1:] + lv[:-1]) / 2, lv + (lv[1] - lv[0]) / (2 * g)]).to(dtype)
        flat[: min(special.numel(), flat.numel())] = special[: flat.numel()]
    lambdas = [(torch.rand(s, generator=gen) * 2).to(dtype) for s in LAYERS]
    return weights, lambdas, constraint_ref.level_table(torch.tensor(levels), scales, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constraint_kernels(dtype):
    """constraint_pass_* / constraint_quantize_* / constraint_multiplier_step_*: every
    element-wise output bit for bit the CPU kernel's (= the reference's); the two sums within
    float32 rounding of block sums (1e-5 relative)."""
    weights, lambdas, table = _constraint_layers(dtype)
    for with_grads, with_lgrads in [(True, True), (False, True), (True, False)]:
        outs = {}
        for name, backend in (("emu", constraint_cupy), ("cpu", constraint_cpu)):
            grads = [torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype) for w in weights]
            lgrads = [torch.full_like(w, 7.0) for w in weights]
            sums = backend.constraint_pass(weights, lambdas, table, grads if with_grads else [],
                                           lgrads if with_lgrads else [])
            outs[name] = sums, grads, lgrads
        (sums, grads, lgrads), (c_sums, c_grads, c_lgrads) = outs["emu"], outs["cpu"]
        assert_close(sums, c_sums, 1e-6, 1e-5, "sums")
        assert all(torch.equal(a, b) for a, b in zip(grads + lgrads, c_grads + c_lgrads))
    for w, row in zip(weights, table):
        assert torch.equal(constraint_cupy.quantize(w, row[None]), constraint_cpu.quantize(w, row[None]))
    scalars = constraint_ref.adam_scalars(3, 0.01, (0.9, 0.999), 1e-8, 0.01, decoupled=dtype == torch.float16)
    states = {}
    for name, backend in (("emu", constraint_cupy), ("ref", constraint_ref)):
        lam = [l.clone() for l in lambdas]
        m = [torch.randn(l.shape, generator=torch.Generator().manual_seed(2)).to(dtype) * 0.1 for l in lambdas]
        v = [torch.rand(l.shape, generator=torch.Generator().manual_seed(3)).to(dtype) * 0.1 for l in lambdas]
        backend.multiplier_step(weights, lam, m, v, table, scalars)
        states[name] = lam + m + v
    assert all(torch.equal(a, b) for a, b in zip(states["emu"], states["ref"]))


# --- sigmoid_quant ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_quant_kernels(dtype):
    """sigmoid_quant_forward_* / backward_*: within the dtype's GRAD_TOL of the reference
    (expf: the host's, not the device's); alpha's and beta's gradients (block sums) too."""
    levels = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0])
    gaps, mids = levels[1:] - levels[:-1], (levels[1:] + levels[:-1]) / 2
    offset, temperature = float(gaps.sum()) / 2, 3.7
    w = (torch.randn(3, 173) * 0.8).to(dtype)  # 519 weights: 3 blocks, a tail
    alpha, beta = torch.tensor([1.3]), torch.tensor([0.9])
    atol, rtol = GRAD_TOL[dtype]
    args = (w, alpha, beta, gaps, mids, offset, temperature)
    assert_close(sigmoid_cupy.forward(*args), sigmoid_ref.forward(*args), atol, rtol, "y")
    gy = torch.randn(w.shape).to(dtype)
    grads = zip(sigmoid_cupy.backward(gy, *args), sigmoid_ref.backward(gy, *args), ("w", "alpha", "beta"))
    for got, want, name in grads:
        assert_close(got.reshape(want.shape), want, atol * 10 if name != "w" else atol, rtol, f"grad_{name}")


# --- bit packing and the packed convolutions --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("B, R, C", [(1, 1, 1), (2, 3, 32), (1, 5, 77), (3, 40, 33)])
def test_bitpack_kernels(B, R, C, dtype):
    """bitpack_<dtype> / bitunpack_u8: the reference's words, count of values other than 0 and 1
    (packed as 1) and values exactly, on a strided [B, R, C] view."""
    x = torch.randint(-1, 3, (B, C, R)).to(torch.float64 if dtype.is_floating_point else torch.int64)
    if dtype.is_floating_point:
        x[x == -1] = 0.5
    x = x.to(dtype).transpose(1, 2)  # [B, R, C], C strided
    words, bad = bitpack_cupy.pack(x)
    r_words, r_bad = bitpack_ref.pack(x)
    assert torch.equal(words, r_words) and torch.equal(bad, r_bad)
    flat = words.reshape(B * R, -1)
    assert torch.equal(bitpack_cupy.unpack(flat, C, torch.float32), bitpack_ref.unpack(flat, C, torch.float32))


CONVS = [  # N, C, H, W, O, K, stride, padding, dilation, groups
    (4, 3, 5, 7, 5, 3, (1, 1), (1, 1), (1, 1), 1),       # fused epilogue: T = 2 steps of 2 images
    (1, 70, 6, 5, 41, 3, (2, 1), (0, 2), (1, 1), 1),      # K = 9 * 3 words: not a multiple of 8
    (3, 64, 7, 7, 34, 3, (1, 2), (2, 1), (2, 1), 2),      # groups, dilation; Og = 17
    (1, 33, 9, 4, 40, 1, (1, 1), (0, 0), (1, 1), 1),      # 1x1; O = 40 over two channel tiles
]


def _conv_inputs(N, C, H, W, O, K, groups, levels, scale=0.37):
    spikes = torch.randint(0, 2, (N, H, W, groups, C // groups))
    x = bitpack_ref.pack_rows(spikes.reshape(-1, C // groups).float()).reshape(N, H, W, -1)
    q = torch.randint(-1 if levels == "ternary" else 0, 2, (O, C // groups, K, K)).float()
    if levels == "binary":
        q = q * 2 - 1
    return x, pack_weight(q * scale, levels, scale).planes


def _mma(x, planes, scale, bias, stride, padding, dilation, groups):
    """bitconv_mma_kernel with the cuda launcher's grid (csrc/cuda/bitconv.cu: 4 warps of 16
    pixels per block, y = groups * tiles of 32 channels): the cupy backend runs the popc kernel."""
    g = bitconv_ref.Geometry.of(x, planes, stride, padding, dilation, groups)
    out = g.empty_output(x)
    tiles = -(-g.out_per_group // 32)
    grid = (-(-(g.N * g.OH * g.OW) // 64), groups * tiles)
    _cuda_emu.launch("bitconv", "bitconv_mma_kernel", x.device, grid, 128,
                     (x, planes, np.uint64(0) if bias is None else bias, np.float32(scale), out,
                      bitconv_cupy._geometry(g)))
    return out


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "x".join(map(str, c[:6])))
def test_bitconv_kernels(conv, levels):
    """bitconv_popc_kernel (the cupy backend) and bitconv_mma_kernel (the tensor-core path:
    mma.sync m16n8k256 .b1 AND+POPC emulated per the PTX fragment tables) give the reference's
    outputs bit for bit; so does bitconv_lif_kernel (the fused epilogue) where it applies."""
    N, C, H, W, O, K, stride, padding, dilation, groups = conv
    x, planes = _conv_inputs(N, C, H, W, O, K, groups, levels)
    bias = torch.randn(O)
    args = (x, planes, 0.37, bias, stride, padding, dilation, groups)
    want = bitconv_ref.conv2d(*args)
    assert torch.equal(bitconv_cupy.conv2d(*args), want)
    assert torch.equal(_mma(*args), want)
    assert torch.equal(_mma(x, planes, 0.37, None, stride, padding, dilation, groups),
                       bitconv_ref.conv2d(x, planes, 0.37, None, stride, padding, dilation, groups))
    if groups == 1 or (O // groups) % 32 == 0:
        T = 2 if N % 2 == 0 else N
        for soft, kind in [(False, NEURONS["lif"]), (True, NEURONS["if"])]:
            p = NeuronParams(v_threshold=0.8, v_reset=None if soft else 0.0, kind=kind, decay_input=not soft)
            mul, add = torch.rand(O) * 0.2, torch.randn(O) * 0.3
            lif = (x, planes, mul, add, stride, padding, dilation, groups, T, 0.5, p)
            for got, ref in zip(bitconv_cupy.conv2d_lif(*lif), bitconv_ref.conv2d_lif(*lif)):
                assert torch.equal(got, ref)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_bitconv_lif_kernel_fires_on_the_threshold(levels):
    """The tie rule S = (H - V_th >= 0) in bitconv_lif_kernel: with the affine y = c / 4 (c the
    integer count) H = c / 4 is exact, so counts c = 4 land on V_th = 1 (random affines never do)."""
    x, planes = _conv_inputs(2, 12, 4, 4, 32, 3, 1, levels)
    one = (1, 1)
    counts = bitconv_ref.conv2d(x, planes, 1.0, None, one, one, one, 1)
    assert bool((counts[:1] == 4).any()), "the case must put some H exactly on the threshold"
    p = NeuronParams(v_threshold=1.0, v_reset=0.0, kind=NEURONS["if"])
    lif = (x, planes, torch.full((32,), 0.25), torch.zeros(32), one, one, one, 1, 2, 1.0, p)
    for got, ref in zip(bitconv_cupy.conv2d_lif(*lif), bitconv_ref.conv2d_lif(*lif)):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("levels, input_max", [("binary", 1), ("ternary", 3)])
def test_integer_forward_on_the_cuda_kernels(levels, input_max, monkeypatch):
    """The quantized layers' exact integer forward (nn/integer_forward.py) with the cupy
    backend: the weight's and the input's float32 bit planes packed by bitpack_f32, the counts
    by bitconv_popc_kernel; float32(count) * scale + bias bit for bit."""
    from cbp_kernels.nn.integer_forward import IntegerForward, integer_conv2d

    torch.manual_seed(input_max)
    x = torch.randint(0, input_max + 1, (3, 70, 6, 5)).float()
    q = torch.randint(-1 if levels == "ternary" else 0, 2, (41, 70, 3, 3)).float()
    q = q * 2 - 1 if levels == "binary" else q
    scale, bias = torch.tensor(0.37), torch.randn(41)
    spec = IntegerForward(input_max, levels, scale, "cupy")
    launched = []
    monkeypatch.setattr(_cupy, "launch", lambda *a: launched.append(a[1]) or _cuda_emu.launch(*a))
    got = integer_conv2d(x, q * scale, bias, (2, 1), (1, 2), (1, 1), 1, spec)
    assert launched == ["bitpack_f32", "bitpack_f32", "bitconv_popc_kernel"]  # weight planes, input planes, counts
    want = F.conv2d(x.double(), q.double(), None, (2, 1), (1, 2)).float() * scale + bias.view(-1, 1, 1)
    assert torch.equal(got, want)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize("op", ["neuron", "constraint", "sigmoid_quant", "bitpack", "bitconv"])
def test_kernels_use_no_local_memory(tmp_path, op):
    """ptxas -v for sm_80 and sm_90 of the text the cupy backend compiles (no torch headers, no
    include path): no kernel of csrc/cuda/<op>.cuh has a stack frame or spills (the mma
    kernel's accumulators are registers: unrolled loops, constant indices; constraint_pass
    spilled 8 bytes with an `unroll 4` pragma)."""
    source = tmp_path / f"{op}.cu"
    source.write_text(cuda_source(op))
    done = subprocess.run(["nvcc", *_cupy.NVRTC_OPTIONS, "-c", "-o", str(tmp_path / f"{op}.o"), "-Xptxas", "-v",
                           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                           str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'\s*\n.*?\n\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    kernels = _cuda_emu.kernels(op).params
    assert {(name, arch) for name, arch, *_ in reports} == {(k, f"sm_{a}") for k in kernels for a in (80, 90)}
    local = [r for r in reports if r[2:] != ("0", "0", "0")]
    assert not local, f"local memory (kernel, arch, stack, spill stores, spill loads): {local}"
