"""The public constraint ops of CBP: validation, backend choice and the torch.library custom
ops (with fake implementations, so torch.compile traces them).

- ``quantize``: Q(w) onto the scaled levels, straight-through gradient (one elementwise pass).
- ``constraint_pass``: ONE fused pass over all quantized layers (one kernel launch for every
  layer) that returns sum(lambda * cs(w; g)) and sum(cs(w)) and, on request, adds
  lambda * dcs/dw into the weights' gradients and writes cs(w; g) as the multipliers' gradient.
- ``multiplier_step``: ONE fused pass over all quantized layers that takes one gradient-ascent
  Adam / AdamW step of every multiplier lambda on cs(w; g) (the multiplier update of CBP),
  the optimizer state held by the caller.

The math (and every tie-breaking choice) is documented in ``reference.py``; all backends read
one table of per-layer constants built there (``level_table``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import kernels, resolve_backend
from ..utils import check_finite, check_kernel_dtype, check_same_device, check_tensor
from .reference import adam_scalars, compute_dtype, level_table

__all__ = ["quantize", "quantize_table", "quantize_with_table", "constraint_pass", "multiplier_step"]

@torch.library.custom_op("cbp_kernels::constraint_quantize", mutates_args=())
def _quantize(w: torch.Tensor, table: torch.Tensor, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).quantize(w, table)


@_quantize.register_fake
def _(w, table, backend):
    return torch.empty_like(w)


def _quantize_backward(ctx, grad):
    return grad, None, None  # straight-through: dQ/dw = 1


torch.library.register_autograd("cbp_kernels::constraint_quantize", _quantize_backward)


@torch.library.custom_op("cbp_kernels::constraint_pass", mutates_args=("grads", "lambda_grads"))
def _constraint_pass(
    weights: list[torch.Tensor], lambdas: list[torch.Tensor], table: torch.Tensor,
    grads: list[torch.Tensor], lambda_grads: list[torch.Tensor], backend: str,
) -> torch.Tensor:
    return kernels(__package__, backend).constraint_pass(weights, lambdas, table, grads, lambda_grads)


@_constraint_pass.register_fake
def _(weights, lambdas, table, grads, lambda_grads, backend):
    return weights[0].new_empty(2, dtype=torch.float64)


@torch.library.custom_op("cbp_kernels::constraint_multiplier_step", mutates_args=("lambdas", "exp_avgs", "exp_avg_sqs"))
def _multiplier_step(
    weights: list[torch.Tensor], lambdas: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], table: torch.Tensor, scalars: torch.Tensor, backend: str,
) -> None:
    kernels(__package__, backend).multiplier_step(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars)


@_multiplier_step.register_fake
def _(weights, lambdas, exp_avgs, exp_avg_sqs, table, scalars, backend):
    return None


def _checked_levels(levels) -> torch.Tensor:
    check_tensor("levels", levels, dtypes=(torch.float32, torch.float64))
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"levels must be a non-empty 1-D tensor, got shape {tuple(levels.shape)}")
    if not torch.compiler.is_compiling():
        check_finite("levels", levels)
        if not bool((levels[1:] > levels[:-1]).all()):
            raise ValueError(f"levels must be sorted ascending without duplicates, got {levels.tolist()}")
    return levels


def _checked_scales(name: str, scales, count: int, device: torch.device) -> torch.Tensor:
    if isinstance(scales, Sequence) and not isinstance(scales, str):  # a list of floats, one per layer
        scales = torch.tensor([check_finite(f"{name}[{i}]", s) for i, s in enumerate(scales)], dtype=torch.float32,
                              device=device)
    elif not isinstance(scales, torch.Tensor):
        scales = torch.tensor(check_finite(name, scales), dtype=torch.float32, device=device)
    check_tensor(name, scales, dtypes=(torch.float32, torch.float64))
    if scales.numel() != count or scales.dim() > 1:
        raise ValueError(f"{name} must hold {count} value(s) (0-dim or [{count}]), got shape {tuple(scales.shape)}")
    if scales.device != device:
        raise ValueError(f"{name} is on {scales.device} but the weights are on {device}")
    if not torch.compiler.is_compiling():
        check_finite(name, scales)
        if not bool((scales > 0).all()):
            raise ValueError(f"{name} must be > 0, got {scales.tolist()}")
    return scales


def _checked_g(g) -> float:
    g = check_finite("g", g)
    if g < 1:
        raise ValueError(f"g (the window parameter) must be >= 1, got {g}")
    return g


def _table(levels, scales, g, dtype, device) -> torch.Tensor:
    return level_table(levels.to(device), scales.to(device), g, compute_dtype(dtype))


def quantize(w: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor | float, *, backend: str = "auto") -> torch.Tensor:
    """Q(w): each weight onto the level ``scale * levels[k]`` picked by thresholds at the midpoints
    (a weight exactly on a midpoint goes to the upper level), with a straight-through gradient.

    Args:
        w: weights of any shape, float32 / float16 / bfloat16 (float64 on the reference backend);
            non-contiguous input is read through a contiguous copy.
        levels: 1-D sorted, unique, finite unscaled levels, float32 (e.g. ``[-1., 0., 1.]``).
        scale: the layer's scale s > 0: 0-dim or one-element tensor on w's device, or a float.
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        Q(w), same shape and dtype as w (contiguous); ``dQ/dw = 1`` under autograd.
    """
    check_tensor("w", w)
    return quantize_with_table(w, *quantize_table(levels, scale, w.dtype, w.device, backend=backend))


def quantize_table(levels: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype, device: torch.device, *,
                   backend: str = "auto") -> tuple[torch.Tensor, str]:
    """``quantize``'s checks of ``levels`` and ``scale`` (arguments as its) and what it computes
    from them for weights of ``dtype`` on ``device``: (the level table, the resolved backend).
    A layer whose levels and scale stay fixed makes them once and calls ``quantize_with_table``
    (each call of ``quantize`` rebuilds them: ~0.13 ms of small host ops per layer)."""
    levels = _checked_levels(levels)
    scale = _checked_scales("scale", scale, 1, device)
    backend = resolve_backend(backend, "constraint_quantize", device, __package__)
    check_kernel_dtype(backend, dtype)
    return _table(levels, scale, 1.0, dtype, device), backend


def quantize_with_table(w: torch.Tensor, table: torch.Tensor, backend: str) -> torch.Tensor:
    """``quantize(w, ...)`` from ``quantize_table``'s result for w's dtype and device; w unchecked."""
    return _quantize(w.contiguous(), table, backend)


def _check_companions(name: str, tensors, weights) -> list[torch.Tensor]:
    """A list beside ``weights``: same length, each tensor contiguous with its weight's shape,
    dtype and device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) != len(weights):
        raise ValueError(f"{name} must be a sequence of {len(weights)} tensors, one per weight")
    for i, (t, w) in enumerate(zip(tensors, weights)):
        check_tensor(f"{name}[{i}]", t)
        check_same_device(f"weights[{i}]", w, **{f"{name}[{i}]": t})
        if t.shape != w.shape:
            raise ValueError(f"{name}[{i}] must have the shape of weights[{i}] {tuple(w.shape)}, got {tuple(t.shape)}")
        if t.dtype != w.dtype:
            raise TypeError(f"{name}[{i}] must have the dtype of weights[{i}] ({w.dtype}), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (the pass reads and writes it in place)")
    return list(tensors)


def _checked_weights(weights) -> list[torch.Tensor]:
    """A non-empty sequence of contiguous tensors of one dtype on one device."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise ValueError("weights must be a non-empty sequence of tensors")
    weights = list(weights)
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w)
        check_same_device("weights[0]", weights[0], **{f"weights[{i}]": w})
        if w.dtype != weights[0].dtype:
            raise TypeError(f"weights must share one dtype: weights[0] is {weights[0].dtype}, weights[{i}] is {w.dtype}")
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous")
    return weights


def constraint_pass(
    weights: Sequence[torch.Tensor],
    lambdas: Sequence[torch.Tensor],
    levels: torch.Tensor,
    scales: torch.Tensor,
    g: float,
    *,
    grads: Sequence[torch.Tensor] | None = None,
    lambda_grads: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused pass of the CBP constraint over all quantized layers (one kernel launch).

    Args:
        weights: the L quantized weight tensors (any shapes), contiguous, all one dtype
            (float32 / float16 / bfloat16; float64 on the reference backend) and one device.
        lambdas: the Lagrange multipliers, one tensor per weight with its shape and dtype.
        levels: 1-D sorted, unique, finite unscaled levels (float32).
        scales: ``[L]`` float32 per-layer scales s > 0 (levels used: ``scales[i] * levels``), a
            tensor or a list of L floats.
        g: the unconstrained-window parameter, >= 1.
        grads: optional, the weights' gradients (``w.grad``): ``grads[i] += lambdas[i] * dcs/dw``
            in place (dcs/dw is the right derivative; see reference.py).
        lambda_grads: optional, one tensor per weight (shape and dtype of ``lambdas[i]``):
            overwritten with cs(w_i; g), the gradient of the Lagrangian w.r.t. lambda (step the
            multiplier optimizer with ``maximize=True``).
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        ``(sum_i sum(lambdas[i] * cs(w_i; g)), sum_i sum(cs(w_i)) without the window)``, 0-dim
        float64 tensors on the weights' device (divide the second by the weight count for CFS).
        NaN / Inf weights make them non-finite. No autograd through this op (an update pass).
    """
    weights = _checked_weights(weights)
    lambdas = _check_companions("lambdas", lambdas, weights)
    grads = [] if grads is None else _check_companions("grads", grads, weights)
    lambda_grads = [] if lambda_grads is None else _check_companions("lambda_grads", lambda_grads, weights)
    levels = _checked_levels(levels)
    device = weights[0].device
    scales = _checked_scales("scales", scales, len(weights), device)
    g = _checked_g(g)
    backend = resolve_backend(backend, "constraint_pass", device, __package__)
    check_kernel_dtype(backend, weights[0].dtype)
    with torch.no_grad():
        sums = _constraint_pass(
            [w.detach() for w in weights], [lam.detach() for lam in lambdas],
            _table(levels, scales, g, weights[0].dtype, device), grads, lambda_grads, backend,
        )
    return sums[0], sums[1]


def _checked_adam(step, lr, betas, eps, weight_decay, decoupled) -> tuple:
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the 1-based index of this step), got {step!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if check_finite(name, value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if isinstance(betas, torch.Tensor) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= check_finite(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not isinstance(decoupled, bool):
        raise TypeError(f"decoupled must be a bool, got {decoupled!r}")
    return step, float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay), decoupled


def multiplier_step(
    weights: Sequence[torch.Tensor],
    lambdas: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    levels: torch.Tensor,
    scales: torch.Tensor,
    g: float,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    backend: str = "auto",
) -> None:
    """The CBP multiplier update in one fused pass over all quantized layers (one kernel launch):
    for every weight, grad = cs(w; g) (windowed, the value ``constraint_pass`` writes into
    ``lambda_grads``) and one gradient-ASCENT step of lambda, exactly the arithmetic of
    ``torch.optim.Adam(maximize=True)`` (``decoupled=False``, L2 ``weight_decay`` added to the
    gradient) or ``torch.optim.AdamW(maximize=True)`` (``decoupled=True``: lambda *= 1 - lr*wd),
    amsgrad off, each operation rounded once in float32 (see reference.py; against torch's own
    kernels the results agree to a few ulp, not bit for bit).

    Args:
        weights: the L quantized weight tensors, as for ``constraint_pass``.
        lambdas: the multipliers (one per weight, its shape, dtype, device; contiguous):
            updated in place.
        exp_avgs, exp_avg_sqs: the Adam moments m and v, one per weight, in the weights' dtype
            (the optimizer state stays in the lambda dtype, as torch.optim.Adam keeps it;
            arithmetic is float32 whatever the storage), contiguous; zeros before the first
            step; updated in place.
        levels, scales, g: as for ``constraint_pass``.
        step: this step's 1-based index (torch's ``state["step"]`` after its increment): the
            bias corrections use it.
        lr, betas, eps, weight_decay: as for torch.optim.Adam; lr, eps, weight_decay >= 0,
            betas in [0, 1).
        decoupled: False: Adam; True: AdamW.
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Every argument is checked before anything changes. No autograd (an update pass).
    """
    weights = _checked_weights(weights)
    lambdas = _check_companions("lambdas", lambdas, weights)
    exp_avgs = _check_companions("exp_avgs", exp_avgs, weights)
    exp_avg_sqs = _check_companions("exp_avg_sqs", exp_avg_sqs, weights)
    levels = _checked_levels(levels)
    device = weights[0].device
    scales = _checked_scales("scales", scales, len(weights), device)
    g = _checked_g(g)
    adam = _checked_adam(step, lr, betas, eps, weight_decay, decoupled)
    backend = resolve_backend(backend, "constraint_multiplier_step", device, __package__)
    check_kernel_dtype(backend, weights[0].dtype)
    dtype = compute_dtype(weights[0].dtype)
    with torch.no_grad():
        _multiplier_step(
            [w.detach() for w in weights], [lam.detach() for lam in lambdas], [m.detach() for m in exp_avgs],
            [v.detach() for v in exp_avg_sqs], _table(levels, scales, g, weights[0].dtype, device),
            adam_scalars(*adam, dtype=dtype).to(device), backend,
        )
