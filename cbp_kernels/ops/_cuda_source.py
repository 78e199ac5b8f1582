"""The CUDA kernel sources (csrc/cuda/<op>.cuh) as text, for the ``cupy`` backends' NVRTC.

Found in the source checkout (``<repo>/csrc``) or, in an installed package, in the copy
that setup.py ships (``cbp_kernels/_csrc``). The project's own ``#include "..."`` lines
(``common/<op>_math.h``) are inlined, once each, so NVRTC needs no include path and CuPy's
kernel cache, keyed by the source text, sees every header change.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["csrc_root", "cuda_source"]

_PACKAGE = Path(__file__).resolve().parents[1]  # cbp_kernels/
_ROOTS = (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc")
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def csrc_root() -> Path:
    """The directory holding ``cuda/`` and ``common/``: the checkout's, else the packaged copy."""
    for root in _ROOTS:
        if (root / "cuda").is_dir():
            return root
    raise FileNotFoundError(f"no CUDA kernel sources found (looked for cuda/ in {[str(r) for r in _ROOTS]})")


@functools.lru_cache(maxsize=None)
def cuda_source(op: str) -> str:
    """The text of ``cuda/<op>.cuh`` with its local includes inlined (one copy of each)."""
    root = csrc_root()
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        if path in seen:
            return ""
        seen.add(path)
        if not path.is_file():
            raise FileNotFoundError(f"CUDA source {path} is missing (included from the {op!r} kernels)")
        return _LOCAL_INCLUDE.sub(lambda m: expand(root / m.group(1)), path.read_text())

    return expand(root / "cuda" / f"{op}.cuh")
