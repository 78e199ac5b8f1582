"""The `cupy` backend: the CUDA kernels of csrc/cuda/neuron.cuh compiled at run time by
CuPy's NVRTC (for an extension built without CUDA). Same kernels, grid and float32 math as
the `cuda` backend, launched on torch's current stream; tensors cross by DLPack (zero copy).
Same signature as ``reference``; CUDA tensors only.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .._cuda_source import cuda_source
from .params import NeuronParams

# --fmad=false: no mul+add contraction, so the spikes are bitwise the reference's.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
THREADS = 256  # kNeuronThreads in csrc/cuda/neuron.cuh
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def kernel_name(direction: str, dtype: torch.dtype) -> str:
    """The extern "C" kernel of csrc/cuda/neuron.cuh for ``direction`` ("forward"/"backward") and storage dtype."""
    return f"neuron_{direction}_{_SUFFIX[dtype]}"


def _nvrtc_options() -> tuple[str, ...]:
    """NVRTC_OPTIONS plus the CUDA toolkit's include directory when there is one, for
    cuda_fp16.h / cuda_bf16.h where this NVRTC does not carry them built in."""
    import os

    from torch.utils.cpp_extension import CUDA_HOME

    include = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
    return NVRTC_OPTIONS + ((f"-I{include}",) if include and os.path.isdir(include) else ())


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source("neuron"), options=_nvrtc_options())


@functools.lru_cache(maxsize=None)
def _kernel(direction: str, dtype: torch.dtype, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(device_index).get_function(kernel_name(direction, dtype))


def _arg(t: torch.Tensor):
    """A zero-copy CuPy view of a contiguous tensor: only its address matters to the kernel
    (16-bit floats travel as int16, CuPy having no bfloat16)."""
    import cupy

    return cupy.from_dlpack(t.view(torch.int16) if t.element_size() == 2 else t)


def _launch(direction: str, dtype: torch.dtype, device: torch.device, n: int, args: tuple) -> None:
    """One launch over n columns on torch's current stream; tensors in ``args`` pass by address,
    the rest must already be NumPy scalars of the kernel's parameter types."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _kernel(direction, dtype, index)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:  # DLPack hand-over on that same stream: no sync
        kernel(((n + THREADS - 1) // THREADS,), (THREADS,),
               tuple(_arg(a) if isinstance(a, torch.Tensor) else a for a in args))


def forward(x_seq, v_init, decay, p: NeuronParams):
    """Returns (spike_seq [T, *] in x's dtype, v_last [*] float32, h_seq [T, *] in x's dtype)."""
    T = x_seq.shape[0]
    x = x_seq.reshape(T, -1).contiguous()
    N = x.shape[1]
    spike, h = torch.empty_like(x), torch.empty_like(x)
    v_last = torch.empty(N, dtype=torch.float32, device=x.device)
    _launch("forward", x.dtype, x.device, N, (
        x, v_init.reshape(-1).contiguous(), decay.reshape(1).float(), spike, v_last, h, np.int64(T), np.int64(N),
        np.float32(p.v_threshold), np.float32(p.reset_value), np.int32(p.kind), np.int32(p.soft_reset),
        np.int32(p.decay_input),
    ))
    return spike.view(x_seq.shape), v_last.view(v_init.shape), h.view(x_seq.shape)


def backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p: NeuronParams, need_grad_decay):
    """Gradients (x_seq, v_init, decay); x_seq is read only when need_grad_decay (else it may be empty)."""
    T = h_seq.shape[0]
    h = h_seq.reshape(T, -1).contiguous()
    N = h.shape[1]
    grad_x = torch.empty_like(h)
    grad_v_init = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_decay = torch.zeros(1, dtype=torch.float32, device=h.device)
    x = x_seq.reshape(T, -1).contiguous() if need_grad_decay else h  # h: a valid address never read
    _launch("backward", h.dtype, h.device, N, (
        grad_spike.reshape(T, -1).contiguous(), grad_v_last.reshape(-1).contiguous(), h,
        spike_seq.reshape(T, -1).contiguous(), x, v_init.reshape(-1).contiguous(), decay.reshape(1).float(),
        grad_x, grad_v_init, grad_decay, np.int64(T), np.int64(N), np.float32(p.v_threshold), np.float32(p.reset_value),
        np.int32(p.kind), np.int32(p.soft_reset), np.int32(p.decay_input), np.int32(p.detach_reset),
        np.int32(p.surrogate), np.float32(p.alpha), np.int32(need_grad_decay),
    ))
    return grad_x.view(h_seq.shape), grad_v_init.view(v_init.shape), grad_decay.to(decay.dtype).reshape(decay.shape)
