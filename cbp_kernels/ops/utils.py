"""Checks shared by the public op functions: each raises a clear error naming the argument,
before anything is computed. Kernels assume their input passed these."""
from __future__ import annotations

import math
import numbers

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_finite(name: str, value) -> float | torch.Tensor:
    """A real number (or tensor of them) with no NaN or Inf."""
    if isinstance(value, torch.Tensor):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite, got {value}")
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_pair(name: str, value, minimum: int) -> list[int]:
    """``value`` (an int, or a pair of ints: a convolution's stride, padding, ...) as a pair of
    ints >= ``minimum``; else one ValueError line naming ``name``."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_kernel_dtype(backend: str, dtype: torch.dtype) -> None:
    if backend != "reference" and dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend {backend!r} computes in {[str(d) for d in KERNEL_DTYPES]}, got {dtype}; "
            "use backend='reference' for float64 (gradcheck)"
        )
