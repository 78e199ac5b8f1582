"""The `cupy` backends' one launcher: compiles csrc/cuda/<op>.cuh with CuPy's NVRTC (once
per op and device) and launches its extern "C" kernels on torch's current stream, tensors
crossing by DLPack (zero copy). CUDA tensors only; imported only when a cupy backend runs."""
from __future__ import annotations

import functools
import os

import numpy
import torch

from ._cuda_source import cuda_source

__all__ = ["launch", "launch_items", "dtype_suffix"]

# --fmad=false: no mul+add contraction, so results round as the compiled `cuda` backend's (and
# as the CPU kernels'); NVRTC's defaults keep IEEE division and sqrt (-prec-div=true,
# -prec-sqrt=true) and denormals (-ftz=false), as nvcc's do for the extension.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
ITEM_THREADS = 256  # threads per block of the one-thread-per-item kernels (launch_items)
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def dtype_suffix(dtype: torch.dtype) -> str:
    """The suffix of the kernel instantiated for a storage dtype (``neuron_forward_f16``...)."""
    return _SUFFIX[dtype]


def _nvrtc_options() -> tuple[str, ...]:
    """NVRTC_OPTIONS plus the CUDA toolkit's include directory when there is one, for
    cuda_fp16.h / cuda_bf16.h where this NVRTC does not carry them built in."""
    from torch.utils.cpp_extension import CUDA_HOME

    include = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
    return NVRTC_OPTIONS + ((f"-I{include}",) if include and os.path.isdir(include) else ())


@functools.lru_cache(maxsize=None)
def _kernel(op: str, name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source(op), options=_nvrtc_options()).get_function(name)


def _arg(value):
    """Tensors pass by address (a zero-copy CuPy view; 16-bit floats as int16, CuPy having no
    bfloat16), None as a null pointer (8 zero bytes, a pointer parameter's size: CuPy itself would
    pass None as 0xffffffff, cupy/cupy#9046); everything else must already be a NumPy scalar of
    the kernel's parameter type."""
    if value is None:
        return numpy.uint64(0)
    if not isinstance(value, torch.Tensor):
        return value
    import cupy

    return cupy.from_dlpack(value.view(torch.int16) if value.element_size() == 2 else value)


def launch(op: str, name: str, device: torch.device, grid: int, block: int, args: tuple, shared: int = 0) -> None:
    """Launches kernel ``name`` of csrc/cuda/<op>.cuh with ``grid`` x ``block`` threads."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        _kernel(op, name, index)((grid,), (block,), tuple(_arg(a) for a in args), shared_mem=shared)


def launch_items(op: str, name: str, device: torch.device, items: int, args: tuple) -> None:
    """Launches kernel ``name`` of csrc/cuda/<op>.cuh with one thread per item (ITEM_THREADS per
    block); nothing when there are no items (CUDA refuses an empty grid)."""
    if items:
        launch(op, name, device, (items + ITEM_THREADS - 1) // ITEM_THREADS, ITEM_THREADS, args)
