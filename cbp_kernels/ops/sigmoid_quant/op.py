"""The public sigmoid-sum quantizer op: validation, backend choice, the torch.library custom
op with its fake and its autograd (one kernel launch forward, one backward)."""
from __future__ import annotations

import math

import torch

from .._backend import kernels, resolve_backend
from ..utils import check_finite, check_kernel_dtype, check_same_device, check_tensor
from . import reference

__all__ = ["sigmoid_quantize", "sigmoid_hard_quantize", "level_table"]

MAX_LEVELS = 17


@torch.library.custom_op("cbp_kernels::sigmoid_quant_forward", mutates_args=())
def _sigmoid_quant(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gaps: torch.Tensor, mids: torch.Tensor,
                   offset: float, temperature: float, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).forward(w, alpha, beta, gaps, mids, offset, temperature)


@_sigmoid_quant.register_fake
def _(w, *args):
    return torch.empty_like(w)


@torch.library.custom_op("cbp_kernels::sigmoid_quant_backward", mutates_args=())
def _sigmoid_quant_backward(grad_y: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                            gaps: torch.Tensor, mids: torch.Tensor, offset: float, temperature: float,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = kernels(__package__, backend).backward(grad_y, w, alpha, beta, gaps, mids, offset, temperature)
    return tuple(g.contiguous() for g in grads)


@_sigmoid_quant_backward.register_fake
def _(grad_y, w, alpha, beta, *args):
    return torch.empty_like(w), torch.empty_like(alpha), torch.empty_like(beta)


def _setup_context(ctx, inputs, output):
    w, alpha, beta, gaps, mids = inputs[:5]
    ctx.save_for_backward(w, alpha, beta, gaps, mids)
    ctx.args = inputs[5:]


def _backward(ctx, grad_y):
    w, alpha, beta, gaps, mids = ctx.saved_tensors
    grad_w, grad_a, grad_b = _sigmoid_quant_backward(grad_y.contiguous(), w, alpha, beta, gaps, mids, *ctx.args)
    return grad_w, grad_a, grad_b, None, None, None, None, None


torch.library.register_autograd("cbp_kernels::sigmoid_quant_forward", _backward, setup_context=_setup_context)


def level_table(levels, device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(gaps s_i [n], midpoints b_i [n], offset o = sum(s_i)/2) of a sorted, symmetric level set.

    The sigmoid sum's outputs are -o + (partial sums of the gaps); they land on the levels
    exactly when the set is symmetric about 0 (binary, ternary, {-3,-1,1,3}, ...).
    """
    # checked as Python floats, so torch.compile traces a level list given as constants
    values = [float(v) for v in (levels.flatten().tolist() if isinstance(levels, torch.Tensor) else levels)]
    if len(values) < 2 or len(values) > MAX_LEVELS:
        raise ValueError(f"levels must hold 2 to {MAX_LEVELS} values, got {values}")
    if not all(math.isfinite(v) for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"levels must be finite, sorted and without duplicates, got {values}")
    if any(abs(a + b) > 1e-8 + 1e-5 * abs(b) for a, b in zip(values, reversed(values))):  # torch.allclose's rule
        raise ValueError(f"the sigmoid-sum quantizer needs levels symmetric about 0, got {values}")
    gaps = [b - a for a, b in zip(values, values[1:])]
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]
    return (torch.tensor(gaps, dtype=torch.float32, device=device), torch.tensor(mids, dtype=torch.float32, device=device),
            sum(gaps) / 2)


def _check_scalar_param(name, t, w):
    check_tensor(name, t)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor, got shape {tuple(t.shape)}")
    check_same_device("w", w, **{name: t})


def _checked_biases(biases, mids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``biases`` (the sigmoids' b_i, e.g. k-means midpoints) checked against the level set, or
    the level midpoints when None."""
    if biases is None:
        return mids
    check_tensor("biases", biases)
    check_same_device("w", w, biases=biases)
    if biases.shape != mids.shape:
        raise ValueError(f"biases must hold {mids.numel()} values (one per gap between levels), got shape "
                         f"{tuple(biases.shape)}")
    if biases.numel() > 1 and not torch.compiler.is_compiling() and not bool((biases[1:] > biases[:-1]).all()):
        raise ValueError(f"biases must be increasing, got {biases.tolist()}")
    return biases.float().contiguous()  # the kernels read the b_i as a float32 [n] array


def sigmoid_quantize(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, levels, temperature: float, *,
                     biases: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Differentiable quantization y = alpha * (sum_i s_i sig(clamp(T (beta w - b_i), +-10)) - o).

    Args:
        w: weights ``[*]``, float32 / float16 / bfloat16 (float64 on the reference backend).
        alpha, beta: one-element float tensors (learned per layer; gradients flow to both).
        levels: sorted level set symmetric about 0, e.g. ``[-1, 1]`` or ``[-1, 0, 1]``.
        temperature: T > 0 (grows with the epoch during training).
        biases: the b_i ``[len(levels) - 1]`` increasing (default: the level midpoints; e.g.
            midpoints of k-means centres of beta * W, ``SigmoidConfig(kmeans_biases=True)``).
    Returns:
        ``y`` with w's shape and dtype.
    """
    check_tensor("w", w)
    if w.numel() == 0:
        raise ValueError("w is empty")
    _check_scalar_param("alpha", alpha, w)
    _check_scalar_param("beta", beta, w)
    temperature = check_finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gaps, mids, offset = level_table(levels, w.device)
    mids = _checked_biases(biases, mids, w)
    backend = resolve_backend(backend, "sigmoid_quant_forward", w.device, __package__)
    check_kernel_dtype(backend, w.dtype)
    pdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    alpha, beta = alpha.reshape(()).to(pdt), beta.reshape(()).to(pdt)
    if backend == "reference":
        return reference.forward(w, alpha, beta, gaps.to(pdt), mids.to(pdt), offset, temperature)
    return _sigmoid_quant(w, alpha, beta, gaps, mids, offset, temperature, backend)


def sigmoid_hard_quantize(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, levels,
                          biases: torch.Tensor | None = None) -> torch.Tensor:
    """The inference-time hard steps (the T -> infinity limit of ``sigmoid_quantize``)."""
    gaps, mids, offset = level_table(levels, w.device)
    mids = _checked_biases(biases, mids, w)
    return reference.hard(w, alpha.reshape(()), beta.reshape(()), gaps.to(w.dtype), mids.to(w.dtype), offset)
