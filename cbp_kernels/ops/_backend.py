"""Loads the compiled extension defensively, tells which backends run on this machine, and
holds the ONE dispatch of every op (``resolve_backend`` picks a backend, ``kernels`` is its
module, ``call`` runs a kernel through the op's torch.library custom op or directly).

Backends, by name (every op has the same ones, with one signature):
- ``reference``: plain PyTorch, the specification; always there.
- ``cpu``: C++/OpenMP kernels of the extension ``cbp_kernels._C`` (CPU tensors).
- ``cuda``: CUDA C++ kernels of the same extension, when it was built with CUDA.
- ``cupy``: the same CUDA sources compiled at run time by CuPy (``cupy.RawModule``).
- ``triton``: Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.

Each op package ``cbp_kernels.ops.<op>`` holds one module per backend with the same
functions (``reference.py``, ``compiled.py`` for both ``cpu`` and ``cuda``, ``cupy.py``,
``triton.py``) and its ``op.py``: the public function (validation once), the custom op whose
body is ``kernels(package, backend).<fn>(...)``, its fake and autograd.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

__all__ = ["backends", "call", "has_kernel", "kernels", "resolve_backend", "BACKENDS"]

BACKENDS = ("reference", "cpu", "cuda", "cupy", "triton")
# The module of an op package that holds each backend's functions.
_MODULES = {"reference": "reference", "cpu": "compiled", "cuda": "compiled", "cupy": "cupy", "triton": "triton"}

# Preference per tensor device when ``backend="auto"`` (fastest first).
_AUTO_ORDER = {"cuda": ("cuda", "cupy", "triton", "reference"), "cpu": ("cpu", "reference")}


@functools.lru_cache(maxsize=None)
def _load_extension() -> str | None:
    """Imports ``cbp_kernels._C``; returns None when it loaded, else why it did not."""
    try:
        from cbp_kernels import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as err:
        return str(err)
    return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the extension holds ``cbp_kernels_ext::<op>`` for ``dispatch_key`` (CPU/CUDA).
    Cached: the extension registers its kernels once, as it loads (the dispatcher's answer took
    6.5 us of every op call's backend check)."""
    if _load_extension() is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"cbp_kernels_ext::{op}", dispatch_key)
    except RuntimeError:  # an extension built before this op existed (rebuild: make build)
        return False


def _triton_usable(device: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cupy_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@functools.lru_cache(maxsize=None)
def _has_module(package: str | None, backend: str) -> bool:
    """Whether the op's package has a ``<backend>.py`` (None: do not check)."""
    return package is None or importlib.util.find_spec(f"{package}.{backend}") is not None


@torch.compiler.assume_constant_result
def _available(op: str, backend: str, device: str, package: str | None = None) -> bool:
    if backend in ("cupy", "triton") and not _has_module(package, backend):
        return False
    if backend == "reference":
        return True
    if backend == "cpu":
        return device == "cpu" and has_kernel(op, "CPU")
    if backend == "cuda":
        return device == "cuda" and has_kernel(op, "CUDA")
    if backend == "cupy":
        return device == "cuda" and _cupy_usable()
    if backend == "triton":
        return _triton_usable(device)
    return False


def backends(op: str = "neuron_forward", package: str | None = "cbp_kernels.ops.neuron") -> dict[str, dict[str, bool]]:
    """What runs on this machine: ``{device: {backend: available}}`` for one op: ``op`` names
    its compiled kernel (``cbp_kernels_ext::<op>``), ``package`` the Python package holding its
    ``triton.py`` / ``cupy.py``. The default is the neuron op.

    >>> cbp_kernels.backends()["cpu"]["cpu"]   # the compiled C++ kernel is there
    True
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {dev: {b: _available(op, b, dev, package) for b in BACKENDS} for dev in devices}


def resolve_backend(requested: str, op: str, device: torch.device, package: str | None = None) -> str:
    """The backend to run ``op`` on a tensor of ``device``: ``requested`` checked, or the
    fastest available one for ``"auto"`` (says once when it falls back)."""
    dev = device.type
    if dev not in _AUTO_ORDER:
        raise ValueError(f"cbp_kernels runs on CPU and CUDA tensors, got a tensor on {device}")
    if requested == "auto":
        for name in _AUTO_ORDER[dev]:
            if _available(op, name, dev, package):
                if name != _AUTO_ORDER[dev][0]:
                    why = _load_extension() or f"the extension was built without {_AUTO_ORDER[dev][0]} kernels"
                    _warn_once(f"cbp_kernels: no compiled {dev} kernels ({why}); using the {name} backend")
                return name
    if requested not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {requested!r}")
    if not _available(op, requested, dev, package):
        why = _load_extension() if requested in ("cpu", "cuda") else None
        raise RuntimeError(
            f"backend {requested!r} is not available for {dev} tensors on this machine "
            f"(available: {[b for b, ok in backends(op, package).get(dev, {}).items() if ok]})"
            + (f"; the extension cbp_kernels._C did not load: {why}" if why else "")
        )
    return requested


@functools.lru_cache(maxsize=None)
def kernels(package: str, backend: str):
    """The module of ``package`` (an op package, ``cbp_kernels.ops.<op>``) holding ``backend``'s
    functions, imported on first use (triton / cupy are imported only when they run)."""
    return importlib.import_module(f"{package}.{_MODULES[backend]}")


def call(op, body, *args):
    """Runs an inference op (no autograd) given its torch.library custom op ``op`` and the
    function ``body`` that ``op`` wraps: torch.compile traces ``op``; eager calls run ``body``
    itself, skipping the custom op's Python dispatch (~0.1 ms, 10% of a SEW-ResNet-18 popcount
    layer). Both run the same code."""
    return op(*args) if torch.compiler.is_compiling() else body(*args)
