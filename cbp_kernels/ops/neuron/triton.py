"""The `triton` backend: one forward and one backward kernel launch over all T timesteps.

Each program owns ``BLOCK`` columns of the ``[T, N]`` input (N = all trailing dims) and walks
time inside the kernel with the membrane state in registers. The float32 math and its
operation order are those of csrc/common/neuron_math.h (the Triton functions below mirror
it one to one), compiled without FMA contraction, with IEEE division and libdevice's expf on
a GPU (ops/_triton.py): the spikes are bitwise those of the reference in float32 and the
gradients those of the CUDA kernel (PLIF's dL/dk up to its summation order: per-program
float32 partials added in float64); against the reference's torch ops the gradients agree
within 1e-5 absolute, 1e-4 relative (tests/test_neuron.py). Storage float32 / float16 /
bfloat16, state float32.
Same signature as ``reference``; runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LAUNCH_OPTIONS, exp, grid, use_libdevice
from .layout import backward_buffers, forward_buffers
from .params import NeuronParams

# Columns per program and warps per program: 1024 columns = 8 float32 per thread of 4 warps,
# 16-byte vector loads, and N = 32*64*56*56 still gives ~6300 programs. Not tuned on a GPU
# (no GPU in the session that wrote this); bench/bench_neuron.py measures it.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _charge(v, x, k, v_reset, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """neuron_charge: H = V + X (IF); V + (V_reset - V + X) k; V + (V_reset - V) k + X."""
    if KIND == 0:
        h = v + x
    elif DECAY_INPUT:
        h = v + (v_reset - v + x) * k
    else:
        h = v + (v_reset - v) * k + x
    return h


@triton.jit
def _reset(h, s, v_threshold, v_reset, SOFT_RESET: tl.constexpr):
    """neuron_reset: soft V = H - V_th S; hard V = H (1 - S) + V_reset S."""
    if SOFT_RESET:
        v = h - v_threshold * s
    else:
        v = h * (1.0 - s) + v_reset * s
    return v


@triton.jit
def _surrogate_grad(x, alpha, SURROGATE: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """surrogate_grad: sg'(x) at x = H - V_th (atan, sigmoid, rectangle, triangle, piecewise quadratic)."""
    if SURROGATE == 0:
        z = 1.5707963267948966 * alpha * x
        g = tl.div_rn(alpha * 0.5, 1.0 + z * z)
    elif SURROGATE == 1:
        sig = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + exp(-alpha * x, USE_LIBDEVICE))
        g = alpha * sig * (1.0 - sig)
    elif SURROGATE == 2:
        g = tl.where(tl.abs(x) < tl.div_rn(tl.full(x.shape, 0.5, tl.float32), alpha), alpha, 0.0)
    elif SURROGATE == 3:
        g = alpha * tl.maximum(0.0, 1.0 - tl.abs(x))
    else:
        g = tl.maximum(0.0, alpha - alpha * alpha * tl.abs(x))
    return g


@triton.jit
def _reset_dv_dh(h, s, sg, v_threshold, v_reset, SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
    """reset_dv_dh: dV[t]/dH[t] through the reset (the spike's path dropped when detached)."""
    if DETACH_RESET:
        if SOFT_RESET:
            d = tl.full(h.shape, 1.0, tl.float32)
        else:
            d = 1.0 - s
    elif SOFT_RESET:
        d = 1.0 - v_threshold * sg
    else:
        d = 1.0 - s + (v_reset - h) * sg
    return d


@triton.jit
def _initial_state(state_ptr, cols, mask, default, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr):
    """An [N] state's block (v_init, dL/dV[T-1]), or `default` in every column without one."""
    if HAS_STATE:
        v = tl.load(state_ptr + cols, mask=mask, other=0.0)
    else:
        v = tl.zeros([BLOCK], tl.float32) + default
    return v


@triton.jit(do_not_specialize=["T", "N"])
def _neuron_forward_kernel(
    x_ptr, v_init_ptr, decay_ptr, spike_ptr, v_last_ptr, h_ptr, T, N, v_threshold, v_reset,
    KIND: tl.constexpr, SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, HAS_V_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For t = 0..T-1: H[t] = charge(V[t-1], X[t]); S[t] = (H[t] - V_th >= 0); V[t] = reset(H[t], S[t]).
    V[-1] = v_init, or v_reset in every column without one (HAS_V_INIT false: v_init_ptr unread)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    k = tl.load(decay_ptr)
    v = _initial_state(v_init_ptr, cols, mask, v_reset, HAS_V_INIT, BLOCK)
    off = cols
    for _ in range(T):
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        h = _charge(v, x, k, v_reset, KIND, DECAY_INPUT)
        s = tl.where(h - v_threshold >= 0.0, 1.0, 0.0)
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(spike_ptr + off, s.to(spike_ptr.dtype.element_ty), mask=mask)
        v = _reset(h, s, v_threshold, v_reset, SOFT_RESET)
        off += N
    tl.store(v_last_ptr + cols, v, mask=mask)


@triton.jit(do_not_specialize=["T", "N"])
def _neuron_backward_kernel(
    grad_spike_ptr, grad_v_last_ptr, h_ptr, spike_ptr, x_ptr, v_init_ptr, decay_ptr,
    grad_x_ptr, grad_v_init_ptr, grad_k_partial_ptr, T, N, v_threshold, v_reset, alpha,
    KIND: tl.constexpr, SOFT_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, NEED_GRAD_K: tl.constexpr, HAS_V_INIT: tl.constexpr, HAS_GRAD_V_LAST: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reverse time loop: gH = gS sg'(H - V_th) + gV dV/dH; gX = gH dH/dX; gV[t-1] = gH dH/dV;
    PLIF: this program's sum over its columns and t of gH dH/dk (V[t-1] rebuilt from H[t-1], S[t-1]).
    Without v_init (HAS_V_INIT false) V[-1] = v_reset and no dL/dv_init is stored; without
    grad_v_last, dL/dV[T-1] = 0."""
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    k = tl.load(decay_ptr)
    if KIND == 0:
        dh_dv = 1.0
        dh_dx = 1.0
    else:
        dh_dv = 1.0 - k
        dh_dx = k if DECAY_INPUT else 1.0
    gv = _initial_state(grad_v_last_ptr, cols, mask, 0.0, HAS_GRAD_V_LAST, BLOCK)
    v0 = _initial_state(v_init_ptr, cols, mask, v_reset, HAS_V_INIT, BLOCK) if NEED_GRAD_K else gv
    gk = tl.zeros([BLOCK], tl.float32)
    off = cols + T.to(tl.int64) * N
    for _ in range(T):
        off -= N
        h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(spike_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sg = _surrogate_grad(h - v_threshold, alpha, SURROGATE, USE_LIBDEVICE)
        gs = tl.load(grad_spike_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gh = gs * sg + gv * _reset_dv_dh(h, s, sg, v_threshold, v_reset, SOFT_RESET, DETACH_RESET)
        tl.store(grad_x_ptr + off, (gh * dh_dx).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_GRAD_K:
            has_prev = off >= N  # t > 0
            h_prev = tl.load(h_ptr + off - N, mask=mask & has_prev, other=0.0).to(tl.float32)
            s_prev = tl.load(spike_ptr + off - N, mask=mask & has_prev, other=0.0).to(tl.float32)
            v_prev = tl.where(has_prev, _reset(h_prev, s_prev, v_threshold, v_reset, SOFT_RESET), v0)
            if DECAY_INPUT:
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                dh_dk = v_reset - v_prev + x
            else:
                dh_dk = v_reset - v_prev
            gk += gh * dh_dk
        gv = gh * dh_dv
    if HAS_V_INIT:
        tl.store(grad_v_init_ptr + cols, gv, mask=mask)
    if NEED_GRAD_K:
        tl.store(grad_k_partial_ptr + pid, tl.sum(gk, axis=0))


def forward(x_seq, v_init, decay, p: NeuronParams):
    """Returns (spike_seq [T, *] in x's dtype, v_last [*] float32, h_seq [T, *] in x's dtype)."""
    x, v0, spike, v_last, h = forward_buffers(x_seq, v_init)
    T, N = x.shape
    k = decay.reshape(1).float()
    _neuron_forward_kernel[grid(triton.cdiv(N, BLOCK))](
        x, k if v0 is None else v0, k, spike, v_last, h, T, N, p.v_threshold,
        p.reset_value, KIND=p.kind, SOFT_RESET=p.soft_reset, DECAY_INPUT=p.decay_input, HAS_V_INIT=v0 is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )
    return spike.view(x_seq.shape), v_last.view(x_seq.shape[1:]), h.view(x_seq.shape)


def backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p: NeuronParams, need_grad_decay):
    """Gradients (x_seq, v_init, decay); x_seq is read only when need_grad_decay (else it may be empty)."""
    gs, gvl, h, s, x, v0, grad_x, grad_v_init = backward_buffers(grad_spike, grad_v_last, h_seq, spike_seq, x_seq,
                                                                 v_init, need_grad_decay)
    T, N = h.shape
    programs = triton.cdiv(N, BLOCK)
    partial = torch.zeros(programs, dtype=torch.float32, device=h.device)
    k = decay.reshape(1).float()  # also the (unread) address of an absent state
    _neuron_backward_kernel[grid(programs)](
        gs, k if gvl is None else gvl, h, s, x, k if v0 is None else v0, k,
        grad_x, k if v0 is None else grad_v_init, partial, T, N, p.v_threshold, p.reset_value, p.alpha, KIND=p.kind,
        SOFT_RESET=p.soft_reset, DECAY_INPUT=p.decay_input, DETACH_RESET=p.detach_reset, SURROGATE=p.surrogate,
        NEED_GRAD_K=need_grad_decay, HAS_V_INIT=v0 is not None, HAS_GRAD_V_LAST=gvl is not None,
        USE_LIBDEVICE=use_libdevice(), BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )
    grad_decay = partial.double().sum().to(decay.dtype).reshape(decay.shape)
    return grad_x.view(h_seq.shape), grad_v_init.view(v_init.shape), grad_decay
