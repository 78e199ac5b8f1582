"""Host emulation of the CUDA kernels: the text that the `cupy` backends hand NVRTC
(``_cuda_source.cuda_source(op)``), compiled for the CPU with csrc/emu/cuda_emu.h, and a
``launch`` with the signature of ``_cupy.launch``, so that the cupy backends' Python code
(argument marshalling, grid sizes) runs on CPU tensors with only NVRTC and the GPU left out.
Used by tests/test_cuda_emu.py; needs a C++20 compiler (``$CXX``, else g++) and the
checkout's csrc/emu (not shipped in a wheel).

The library of an op is built from exactly ``cuda_source(op)`` (its SHA-256 is compiled in:
``kernels(op).source_sha256``), once per content: the build directory is named by a hash of
the source, the emulation headers and the compiler command, under ``$CBP_KERNELS_EMU_CACHE``
(default ``~/.cache/cbp_kernels/cuda_emu``, or the temp dir where that is not writable). Its
extern "C" kernels are found in the preprocessed text (``__global__`` expands to a marker
attribute there) and listed in a generated table; each call passes the addresses of its
argument values, as cudaLaunchKernel, and the C++ parameter types, recovered from each
kernel's type, are checked against the arguments (a tensor or None for a pointer, a NumPy
scalar of the parameter's kind and size otherwise, a NumPy structured scalar of the struct's
size), so no kernel signature is written here and a marshalling mistake is an error instead
of garbage.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy
import torch

from ._cuda_source import csrc_root, cuda_source

__all__ = ["kernels", "library", "launch", "EmulatedKernels"]

CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-ffp-contract=off", "-Wno-attributes", "-Wno-unknown-pragmas")
_KERNEL = re.compile(r'extern\s*"C"\s*\[\[\s*cbp_emu\s*::\s*global\s*\]\]\s*void\s+(\w+)\s*\(')


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _cache_root() -> Path:
    """$CBP_KERNELS_EMU_CACHE, else ~/.cache/cbp_kernels/cuda_emu, else (not writable) one under the temp dir."""
    if "CBP_KERNELS_EMU_CACHE" in os.environ:
        return Path(os.environ["CBP_KERNELS_EMU_CACHE"])
    home = Path.home() / ".cache" / "cbp_kernels" / "cuda_emu"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home if os.access(home, os.W_OK) else Path(tempfile.gettempdir()) / "cbp_kernels_cuda_emu"
    except OSError:
        return Path(tempfile.gettempdir()) / "cbp_kernels_cuda_emu"


def _compile_args(emu: Path, build: Path) -> list[str]:
    return [_cxx(), *CXX_FLAGS, "-include", str(emu / "cuda_emu.h"), "-I", str(emu / "include"), "-I", str(emu.parent),
            "-I", str(build)]


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"host emulation build failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return done.stdout


class EmulatedKernels:
    """The host-emulated kernels of one op's CUDA source (a ctypes library)."""

    def __init__(self, op: str, path: Path):
        self.op = op
        self.lib = lib = ctypes.CDLL(str(path))
        lib.cbp_emu_kernel_name.restype = ctypes.c_char_p
        lib.cbp_emu_kernel_params.restype = ctypes.c_char_p
        lib.cbp_emu_source_sha256.restype = ctypes.c_char_p
        lib.cbp_emu_launch.restype = ctypes.c_char_p
        lib.cbp_emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                       ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        self.source_sha256 = lib.cbp_emu_source_sha256().decode()
        self.params = {}  # kernel name -> [(kind, bytes)] of its C++ parameters
        for i in range(lib.cbp_emu_kernel_count()):
            codes = lib.cbp_emu_kernel_params(i).decode().split()
            self.params[lib.cbp_emu_kernel_name(i).decode()] = (i, [(c[0], int(c[1:])) for c in codes])

    def __call__(self, name: str, grid, block, args: tuple, shared: int = 0) -> None:
        """Runs kernel ``name`` <<<grid, block, shared>>> on the host; raises on a kernel error."""
        if name not in self.params:
            raise KeyError(f"no extern \"C\" kernel {name!r} in the {self.op!r} source (has {sorted(self.params)})")
        index, params = self.params[name]
        if len(args) != len(params):
            raise TypeError(f"{name}: {len(args)} arguments for {len(params)} parameters")
        guards = _Guards()
        keep = [_marshal(name, i, kind, size, guards(value))
                for i, ((kind, size), value) in enumerate(zip(params, args))]
        argv = (ctypes.c_void_p * max(len(keep), 1))(*[ctypes.addressof(b) for b in keep])
        error = self.lib.cbp_emu_launch(index, _dim3(grid), _dim3(block), shared, argv).decode()
        error = error or guards.restore()
        if error:
            raise RuntimeError(f"{self.op}.{name} (host emulation): {error}")


class _Guards:
    """Each contiguous tensor argument runs in a copy with GUARD bytes on both sides (the words
    0x7fc1a5a5: a float32 NaN, a large int), copied back after the launch: a write past either
    end of the tensor is an error, a read there poisons the result. (Addresses inside a launch
    table, as the constraint kernels', point at the tensors themselves.)"""

    GUARD = 256
    PATTERN = torch.tensor([0x7FC1A5A5], dtype=torch.int32).view(torch.uint8).repeat(GUARD // 4)

    def __init__(self):
        self.copies = {}  # (address, bytes) -> (tensor, guarded copy)

    def __call__(self, value):
        if not isinstance(value, torch.Tensor) or not value.is_contiguous() or value.numel() == 0:
            return value
        data = value.reshape(-1).view(torch.uint8)
        key = (value.data_ptr(), data.numel())  # one copy for a tensor passed twice
        if key not in self.copies:
            buf = torch.cat([self.PATTERN, data, self.PATTERN])
            self.copies[key] = (value, buf)
        return self.copies[key][1][self.GUARD:-self.GUARD]

    def restore(self) -> str:
        error = ""
        for (_, nbytes), (tensor, buf) in self.copies.items():
            tensor.reshape(-1).view(torch.uint8).copy_(buf[self.GUARD:-self.GUARD])
            for side, guard in (("before", buf[: self.GUARD]), ("after", buf[-self.GUARD:])):
                if not error and not torch.equal(guard, self.PATTERN):
                    error = f"wrote {side} a {tuple(tensor.shape)} {tensor.dtype} argument ({nbytes} bytes)"
        return error


def _dim3(v) -> ctypes.Array:
    dims = (tuple(v) if isinstance(v, (tuple, list)) else (v,)) + (1, 1)
    return (ctypes.c_uint * 3)(*(int(d) for d in dims[:3]))


def _marshal(name: str, i: int, kind: str, size: int, value) -> ctypes.Array:
    """The bytes of argument i for a parameter of ``kind``/``size`` (as CuPy would pass it)."""
    where = f"{name}: argument {i}"
    if value is None or isinstance(value, torch.Tensor):
        if kind != "p":
            what = "null pointer" if value is None else "tensor"
            raise TypeError(f"{where} is a {what}, the parameter is {kind}{size}")
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise TypeError(f"{where}: the host emulation takes CPU tensors, got {value.device}")
        data = numpy.uint64(0 if value is None else value.data_ptr()).tobytes()
    elif isinstance(value, numpy.generic):
        if isinstance(value, numpy.void):
            got = "s"
        elif isinstance(value, numpy.floating):
            got = "f"
        elif isinstance(value, numpy.uint64) and kind == "p" and value == 0:
            got = "p"  # CuPy's null pointer
        elif isinstance(value, (numpy.integer, numpy.bool_)):
            got = "i"
        else:
            raise TypeError(f"{where}: NumPy scalar of dtype {value.dtype} is not a kernel argument")
        data = value.tobytes()
        if got != kind or len(data) != size:
            raise TypeError(f"{where} is {value.dtype} ({got}{len(data)}), the parameter is {kind}{size}")
    else:
        raise TypeError(f"{where}: {type(value).__name__} is not a tensor, None or a NumPy scalar")
    return ctypes.create_string_buffer(data, len(data))


def kernels(op: str) -> EmulatedKernels:
    """The host-emulated kernels of csrc/cuda/<op>.cuh, built (or found in the cache) from
    exactly ``cuda_source(op)``."""
    return library(op, cuda_source(op))


@functools.lru_cache(maxsize=None)
def library(op: str, source: str) -> EmulatedKernels:
    """The host-emulated extern "C" kernels of CUDA ``source`` (named ``op`` in messages)."""
    emu = csrc_root() / "emu"
    if not (emu / "cuda_emu.h").is_file():
        raise FileNotFoundError(f"the CUDA host emulation needs {emu}/cuda_emu.h (a source checkout)")
    key = hashlib.sha256()
    for part in [source, *(p.read_text() for p in sorted(emu.rglob("*.h"))), " ".join(_compile_args(emu, Path("."))),
                 _run([_cxx(), "--version"])]:
        key.update(part.encode())
    target = _cache_root() / f"{op}-{key.hexdigest()[:20]}"
    lib = target / "kernels.so"
    if not lib.is_file():
        _build(op, source, emu, target)
    return EmulatedKernels(op, lib)


def _build(op: str, source: str, emu: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{op}-", dir=target.parent))
    try:
        (tmp / "kernels.cuh").write_text(source)
        args = _compile_args(emu, tmp)
        names = _KERNEL.findall(_run(args + ["-E", "-x", "c++", str(tmp / "kernels.cuh")]))
        if not names:
            raise RuntimeError(f"no extern \"C\" __global__ kernel found in the {op!r} source")
        digest = hashlib.sha256(source.encode()).hexdigest()
        (tmp / "table.cpp").write_text(
            '#include "kernels.cuh"\n'
            "static const ::cbp_emu::Kernel cbp_emu_table[] = {\n"
            + "".join(f"    CBP_EMU_KERNEL({n})\n" for n in names)
            + f'}};\n#define CBP_EMU_SOURCE_SHA256 "{digest}"\n#include "emu/cuda_emu_lib.h"\n')
        _run(args + ["-shared", str(tmp / "table.cpp"), "-o", str(tmp / "kernels.so")])
        try:
            tmp.rename(target)  # atomic: a concurrent build of the same content wins or loses whole
        except OSError:
            if not (target / "kernels.so").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch(op: str, name: str, device: torch.device, grid, block, args: tuple, shared: int = 0) -> None:
    """``_cupy.launch`` on the host: kernel ``name`` of csrc/cuda/<op>.cuh, grid x block
    threads (ints or (x, y, z) tuples), CPU tensors."""
    kernels(op)(name, grid, block, args, shared)
