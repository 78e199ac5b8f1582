"""The public bit-packing ops: validation, backend choice and the torch.library custom ops
(with fake implementations for torch.compile). Inference ops: no gradient.

Format: along ``dim``, C values in {0, 1} become ceil(C/32) 32-bit words, value c in bit
c % 32 of word c // 32 (least significant bit first), unused high bits 0. The words are
held in **int32** tensors (the same 32 bits as uint32; torch has few uint32 ops): use
``words.view(torch.uint32)`` where an unsigned view is wanted.
"""
from __future__ import annotations

import torch

from .._backend import call, kernels, resolve_backend
from ..utils import check_finite
from .reference import WORD_BITS

__all__ = ["bitpack", "bitunpack", "pack_bits", "packed_size", "WORD_BITS", "SPIKE_DTYPES"]

# Dtypes a {0,1} tensor may have on input to ``bitpack`` and on output of ``bitunpack``.
SPIKE_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)

def packed_size(size: int) -> int:
    """Words that hold ``size`` bits: ceil(size / 32)."""
    return -(-int(size) // WORD_BITS)


def _pack(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(__package__, backend).pack(x)


_bitpack = torch.library.custom_op("cbp_kernels::bitpack", _pack, mutates_args=())


@_bitpack.register_fake
def _(x, backend):
    words = x.new_empty(x.shape[0], x.shape[1], packed_size(x.shape[2]), dtype=torch.int32)
    return words, x.new_empty((), dtype=torch.int64)


def _unpack(words: torch.Tensor, size: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).unpack(words, size, dtype)


_bitunpack = torch.library.custom_op("cbp_kernels::bitunpack", _unpack, mutates_args=())


@_bitunpack.register_fake
def _(words, size, dtype, backend):
    return words.new_empty(words.shape[0], size, dtype=dtype)


def _raise_non_binary(name: str, x: torch.Tensor) -> None:
    bad = (x != 0) & (x != 1)
    idx = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{name} must hold only 0 and 1 (spikes), found {x[idx].item()} at index {idx}; "
        "pass threshold= to binarize (bit = x >= threshold)"
    )


def _check_spikes(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SPIKE_DTYPES:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in SPIKE_DTYPES]}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-dim tensor")
    return x


def _check_dim(dim: int, ndim: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        raise ValueError(f"dim must be an int in [{-ndim}, {ndim}), got {dim!r}")
    return dim % ndim


def bitpack(x: torch.Tensor, dim: int = -1, *, threshold: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Packs the {0,1} values of ``x`` along ``dim`` into 32-bit words (LSB first, zero padded).

    Args:
        x: ``[..., C, ...]`` bool / uint8 / float16 / bfloat16 / float32 / float64, values 0 or 1.
        dim: the dimension to pack (the channel dimension: ``-1`` for NHWC spikes).
        threshold: when given, bit = ``x >= threshold`` (any values allowed); when None, a
            value other than 0 and 1 is an error.
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        int32 words, ``x``'s shape with ``dim`` replaced by ``ceil(C / 32)``.
    """
    return pack_along(x, dim, threshold=threshold, backend=backend, name="x")


def pack_along(x, dim, *, threshold=None, backend: str = "auto", name: str) -> torch.Tensor:
    """``bitpack`` whose errors name the caller's argument ``name``."""
    _check_spikes(name, x)
    dim = _check_dim(dim, x.dim())
    if threshold is not None:
        x = x >= check_finite("threshold", threshold)
    backend = resolve_backend(backend, "bitpack", x.device, __package__)
    moved = x.movedim(dim, -1)
    # [B, R, C]: a view whenever the leading dims merge (e.g. NCHW packed along C), so the
    # kernel reads the strided values without a copy.
    x3 = moved.reshape(1, 1, -1) if moved.dim() == 1 else moved.flatten(1, -2) if moved.dim() > 2 else moved.unsqueeze(0)
    words, bad = call(_bitpack, _pack, x3, backend)
    if not torch.compiler.is_compiling() and bool(bad):
        _raise_non_binary(name, x)
    return words.reshape(*moved.shape[:-1], words.shape[-1]).movedim(-1, dim)


def pack_bits(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``bitpack(x, -1)`` for ``x`` KNOWN to hold only 0 and 1 (a neuron's spikes, a layer's
    declared input, weight sign planes): the kernel alone, nothing checked and nothing read
    back (no device sync; bit = value != 0). The entry point for library code that knows its
    values; users call ``bitpack``.

    x: ``[B, ..., C]`` (at least 2-D, any strides, a ``SPIKE_DTYPES`` dtype) -> int32
    ``[B, ..., ceil(C/32)]``, packed along the last dim. backend: ``"auto"``, or one the
    caller resolved (e.g. a layer's packed-conv backend), used as it is."""
    if backend == "auto":
        backend = resolve_backend(backend, "bitpack", x.device, __package__)
    x3 = x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)
    words, _ = call(_bitpack, _pack, x3, backend)
    return words.reshape(*x.shape[:-1], words.shape[-1])


def bitunpack(
    words: torch.Tensor, dim: int, size: int, dtype: torch.dtype = torch.float32, *, backend: str = "auto"
) -> torch.Tensor:
    """Inverse of ``bitpack``: the first ``size`` bits of the words along ``dim`` as 0 / 1.

    Args:
        words: int32 ``[..., Wc, ...]`` as returned by ``bitpack``.
        dim: the packed dimension.
        size: the number of values C to restore (``ceil(C/32) == Wc``).
        dtype: the output dtype (bool / uint8 / float16 / bfloat16 / float32 / float64).
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        ``words``' shape with ``dim`` replaced by ``size``, of ``dtype``.
    """
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
        raise TypeError(f"words must be an int32 torch.Tensor (from bitpack), got {getattr(words, 'dtype', type(words))}")
    if dtype not in SPIKE_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in SPIKE_DTYPES]}, got {dtype}")
    if words.dim() == 0:
        raise ValueError("words must have at least 1 dimension, got a 0-dim tensor")
    dim = _check_dim(dim, words.dim())
    if not isinstance(size, int) or packed_size(size) != words.shape[dim] or size < 0:
        raise ValueError(f"size must be an int with ceil(size/32) == words.shape[{dim}] = {words.shape[dim]}, got {size!r}")
    backend = resolve_backend(backend, "bitunpack", words.device, __package__)
    moved = words.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1]).contiguous()
    out = call(_bitunpack, _unpack, rows, size, dtype, backend)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, dim)
