"""What every Triton backend shares: its launch options and the math helpers whose GPU and
interpreter versions differ.

On a GPU every kernel is compiled without FMA contraction (``enable_fp_fusion=False``: each
``a * b + c`` rounds twice, as the reference and the CUDA kernels, built with ``--fmad=false``)
and divides and exponentiates as the CUDA kernels do: IEEE division (``div_rn``, not the
``div.full.f32`` approximation of Triton's ``/``) and libdevice's ``expf`` (not ``tl.exp``'s
``ex2.approx``; Triton links libdevice with its flush-to-zero branch, so an e^x below 2^-126
is 0, which no caller can tell apart: each adds it to 1). Under ``TRITON_INTERPRET=1`` (CPU
tensors, the tests) libdevice does not run: ``USE_LIBDEVICE=False`` selects numpy's exp there
and the SWAR bit count of ``bitconv``.
``tests/test_triton_aot.py`` compiles every launch for sm_80 / sm_90 and reads the PTX.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# CUDA's limit on a grid's x dimension; the launchers use 1-D grids (y and z stop at 65535).
MAX_PROGRAMS = 2**31 - 1


# Compile options of every launch: no FMA contraction.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def use_libdevice() -> bool:
    """The ``USE_LIBDEVICE`` constexpr: true when compiled (a GPU), false when interpreted."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def grid(programs: int) -> tuple[int]:
    """A 1-D grid of ``programs`` programs (checked against CUDA's limit on grid.x)."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{programs} Triton programs exceed one launch's {MAX_PROGRAMS}: split the input")
    return (programs,)


@triton.jit
def exp(x, USE_LIBDEVICE: tl.constexpr):
    """e^x: libdevice's expf on a GPU (the CUDA kernels' expf), numpy's when interpreted."""
    if USE_LIBDEVICE:
        return tl.extra.cuda.libdevice.exp(x)
    return tl.exp(x)

