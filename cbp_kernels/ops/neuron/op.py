"""The public multi-step neuron op: validation, backend choice, torch.library custom ops
(with fake implementations for torch.compile) and their autograd.

Forward and backward each run in ONE kernel launch over all T timesteps. The forward saves
H (the membrane potential before the reset, in x's dtype) and uses the spikes it returns;
V[t-1] and the surrogate are rebuilt from them in the backward (the cpu backend saves no H and
recomputes it from X). The default states travel as EMPTY tensors, which every backend reads as
the default: v_init = v_reset, dL/dV[T-1] = 0 when V[T-1] is unused, and no dL/dv_init; so at
small T no [N] tensor is filled, read or written for them (at T = 4 they were a fifth of the
traffic).
"""
from __future__ import annotations

import functools

import torch

from .._backend import call, kernels, resolve_backend
from ..utils import check_choice, check_finite, check_kernel_dtype, check_same_device, check_tensor
from . import reference
from .params import DEFAULT_ALPHA, NEURONS, SURROGATES, NeuronParams

__all__ = ["multistep_neuron"]


def _output_grads(grad_spike, grad_v_last, spike_like: torch.Tensor):
    """The backward's output gradients with autograd's None made the kernels' defaults: dL/dS
    zeros in ``spike_like``'s shape and dtype, dL/dV[T-1] an empty tensor (read as 0)."""
    grad_spike = torch.zeros_like(spike_like) if grad_spike is None else grad_spike.to(spike_like.dtype)
    if grad_v_last is None:
        grad_v_last = spike_like.new_empty(0, dtype=torch.float32)
    return grad_spike, grad_v_last


def _forward(
    x_seq: torch.Tensor, v_init: torch.Tensor, decay: torch.Tensor, v_threshold: float, v_reset: float | None,
    kind: int, decay_input: bool, detach_reset: bool, surrogate: int, alpha: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the scalars are NeuronParams' fields in order (p.fields()): NeuronParams(*them) is p
    p = NeuronParams(v_threshold, v_reset, kind, decay_input, detach_reset, surrogate, alpha)
    return kernels(__package__, backend).forward(x_seq, v_init, decay, p)


_neuron_forward = torch.library.custom_op("cbp_kernels::neuron_forward", _forward, mutates_args=())


# Backends whose forward saves no H (returned empty): their backward recomputes it from x_seq.
_RECOMPUTE_H = {"cpu"}


@_neuron_forward.register_fake
def _(x_seq, v_init, decay, *args):
    backend = args[-1]
    h_seq = x_seq.new_empty(0) if backend in _RECOMPUTE_H else torch.empty_like(x_seq)
    return torch.empty_like(x_seq), x_seq.new_empty(x_seq.shape[1:], dtype=torch.float32), h_seq


def _backward_kernels(
    grad_spike: torch.Tensor, grad_v_last: torch.Tensor, h_seq: torch.Tensor, spike_seq: torch.Tensor,
    x_seq: torch.Tensor, v_init: torch.Tensor, decay: torch.Tensor, v_threshold: float, v_reset: float | None,
    kind: int, decay_input: bool, detach_reset: bool, surrogate: int, alpha: float, backend: str,
    need_grad_decay: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = NeuronParams(v_threshold, v_reset, kind, decay_input, detach_reset, surrogate, alpha)
    return kernels(__package__, backend).backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, p, need_grad_decay)


_neuron_backward = torch.library.custom_op("cbp_kernels::neuron_backward", _backward_kernels, mutates_args=())


@_neuron_backward.register_fake
def _(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, *args):
    return torch.empty_like(grad_spike), torch.empty_like(v_init), torch.empty_like(decay)


def _setup_context(ctx, inputs, output):
    x_seq, v_init, decay = inputs[:3]
    spike_seq, _, h_seq = output
    ctx.need_grad_decay = decay.requires_grad
    # x is needed where H is recomputed from it (an empty H) and for PLIF's dH/dk with
    # decay_input; otherwise save nothing of it.
    x_saved = x_seq if ctx.need_grad_decay or h_seq.numel() == 0 else x_seq.new_empty(0)
    ctx.save_for_backward(h_seq, spike_seq, x_saved, v_init, decay)
    ctx.args = inputs[3:]
    # Unused outputs get None, not a materialized zero tensor: H alone would cost a [T, *]
    # allocation and fill per backward (measured: a quarter of the CPU op's time at T=16).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_spike, grad_v_last, _grad_h, kernels_op=_neuron_backward):
    """The forward op's autograd; ``kernels_op``: the backward custom op (traceable), or its body
    ``_backward_kernels`` (``_EagerNeuron``)."""
    h_seq, spike_seq, x_saved, v_init, decay = ctx.saved_tensors
    grad_spike, grad_v_last = _output_grads(grad_spike, grad_v_last, spike_seq)
    grad_x, grad_v, grad_k = kernels_op(
        grad_spike, grad_v_last, h_seq, spike_seq, x_saved, v_init, decay, *ctx.args, ctx.need_grad_decay
    )
    grad_v = grad_v if v_init.numel() else None  # the default (empty) v_init has no gradient
    return (grad_x, grad_v, grad_k if ctx.need_grad_decay else None) + (None,) * len(ctx.args)


torch.library.register_autograd("cbp_kernels::neuron_forward", _backward, setup_context=_setup_context)


class _EagerNeuron(torch.autograd.Function):
    """The custom op's autograd (same ``_setup_context`` and ``_backward``) around its body, for
    eager calls with a graph: skips the custom op's Python dispatch. ``forward`` takes ``ctx``
    itself: with a separate ``setup_context`` staticmethod, ``Function.apply`` binds the
    arguments with ``inspect.signature`` on every call (~60 us)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, kernels_op=_backward_kernels)


def _checked_tau(neuron: str, tau, x_seq: torch.Tensor) -> torch.Tensor:
    """The decay k = 1/tau as a 0-dim float tensor (differentiable when tau is a tensor)."""
    if neuron == "if" or not isinstance(tau, torch.Tensor):  # IF ignores tau: not a key of the cache
        return _cached(_number_decay, neuron, None if neuron == "if" else tau, x_seq.dtype == torch.float64,
                       x_seq.device)
    if tau.numel() != 1:
        raise ValueError(f"tau must be a number or a one-element tensor, got shape {tuple(tau.shape)}")
    check_same_device("x_seq", x_seq, tau=tau)
    # Value checks read the tensor: done eagerly, skipped while torch.compile traces.
    if not torch.compiler.is_compiling():
        check_finite("tau", tau.detach())
    if not torch.compiler.is_compiling() and not bool(tau.detach() > 1):
        raise ValueError(f"tau must be > 1 for {neuron!r} neurons (SpikingJelly's rule), got {float(tau)}")
    dtype = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
    return tau.reshape(()).to(dtype).reciprocal()


# The checks of the scalar settings are cached (``_cached``): a layer or a loop that calls the op
# with the same settings has them checked once. Run on the caches the kernels have just flushed,
# they were the largest piece of a training step's Python: 81 us of a [4, 2^20] bfloat16 LIF
# step's 3.4 ms, one thread (13 us when run warm in a loop).
@functools.lru_cache(maxsize=256, typed=True)
def _number_decay(neuron: str, tau, float64: bool, device: torch.device) -> torch.Tensor:
    """k = 1/tau for a number tau (IF: 1, whatever tau) as a 0-dim float64 / float32 tensor on
    ``device``, one tensor shared by the calls with these settings (nothing writes to it). Made
    outside inference mode, so that a graph built later may save it."""
    with torch.inference_mode(False):
        if neuron == "if":
            return torch.ones((), dtype=torch.float32, device=device)
        tau = check_finite("tau", tau)
        if tau <= 1:
            raise ValueError(f"tau must be > 1 for {neuron!r} neurons (SpikingJelly's rule), got {tau}")
        return torch.tensor(1.0 / tau, dtype=torch.float64 if float64 else torch.float32, device=device)


@functools.lru_cache(maxsize=256, typed=True)
def _params(neuron, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha) -> NeuronParams:
    """The checked NeuronParams of ``multistep_neuron``'s scalar arguments."""
    check_choice("neuron", neuron, NEURONS)
    check_choice("surrogate", surrogate, SURROGATES)
    v_threshold = check_finite("v_threshold", v_threshold)
    if v_reset is not None:
        v_reset = check_finite("v_reset", v_reset)
        if v_threshold <= v_reset:
            raise ValueError(f"v_threshold ({v_threshold}) must be greater than v_reset ({v_reset})")
    alpha = DEFAULT_ALPHA[surrogate] if alpha is None else check_finite("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return NeuronParams(v_threshold, v_reset, NEURONS[neuron], bool(decay_input), bool(detach_reset),
                        SURROGATES[surrogate], alpha)


def _cached(checks, *args):
    """``checks(*args)``, a functools.lru_cache of checks (typed: 1, 1.0 and True are three keys):
    from its cache where it can; its body while torch.compile traces and where an argument is
    unhashable (the checks then say what is wrong with it). A failed check is not cached."""
    try:
        hash(args)
    except TypeError:
        return checks.__wrapped__(*args)
    return checks.__wrapped__(*args) if torch.compiler.is_compiling() else checks(*args)


def multistep_neuron(
    x_seq: torch.Tensor,
    v_init: torch.Tensor | None = None,
    *,
    neuron: str = "lif",
    tau: float | torch.Tensor = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "atan",
    alpha: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs an IF / LIF / PLIF neuron over all T timesteps (SpikingJelly 2.0 semantics).

    Args:
        x_seq: input current ``[T, *]`` (any trailing shape), float32 / float16 / bfloat16
            (float64 on the reference backend only).
        v_init: membrane potential before the first step, ``[*]``; default ``v_reset``
            (0 for the soft reset).
        neuron: ``"if"``, ``"lif"`` or ``"plif"``. PLIF is LIF whose ``tau`` is a tensor that
            receives a gradient (``cbp_kernels.nn.PLIF`` holds it as SpikingJelly does); a
            float ``tau`` (or one without grad) makes it a plain LIF.
        tau: membrane time constant (> 1) of LIF / PLIF; ignored by IF.
        v_threshold: firing threshold: S[t] = (H[t] >= v_threshold).
        v_reset: hard reset value; ``None`` selects the soft reset (V -= v_threshold).
        decay_input: whether the input is divided by tau in the charge equation.
        detach_reset: detach the spike in the reset path of the backward.
        surrogate: ``"atan"``, ``"sigmoid"``, ``"rectangle"``, ``"triangle"``,
            ``"piecewise_quadratic"``; ``alpha`` defaults per surrogate (2, 4, 1, 1, 1).
        backend: ``"auto"`` or one of ``cbp_kernels.BACKENDS``.

    Returns:
        ``(spike_seq [T, *] in x's dtype, v_last [*] in float32, float64 for float64 input)``.
    """
    return run(x_seq, *prepare(x_seq, v_init, neuron=neuron, tau=tau, v_threshold=v_threshold, v_reset=v_reset,
                                decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha,
                                backend=backend))


def prepare(x_seq, v_init=None, *, neuron="lif", tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True,
            detach_reset=False, surrogate="atan", alpha=None, backend="auto"):
    """``multistep_neuron``'s checks (a clear error for every bad argument) and the arguments
    ``run`` takes after ``x_seq``: (v_init, or an empty tensor for the default; decay k = 1/tau as a
    0-dim tensor, differentiable when tau is; NeuronParams; the resolved backend)."""
    check_tensor("x_seq", x_seq, min_dim=1)
    if x_seq.shape[0] == 0:
        raise ValueError(f"x_seq must have T >= 1 timesteps, got shape {tuple(x_seq.shape)}")
    if x_seq.numel() == 0:
        raise ValueError(f"x_seq is empty (shape {tuple(x_seq.shape)})")
    p = _cached(_params, neuron, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha)
    state_dtype = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
    if v_init is None:
        v_init = x_seq.new_empty(0, dtype=state_dtype)  # the default: v_reset in every column
    else:
        check_tensor("v_init", v_init)
        check_same_device("x_seq", x_seq, v_init=v_init)
        if v_init.shape != x_seq.shape[1:]:
            raise ValueError(f"v_init must have shape {tuple(x_seq.shape[1:])} (x_seq without T), got {tuple(v_init.shape)}")
        v_init = v_init.to(state_dtype)
    decay = _checked_tau(neuron, tau, x_seq)
    backend = resolve_backend(backend, "neuron_forward", x_seq.device, __package__)
    check_kernel_dtype(backend, x_seq.dtype)
    return v_init, decay, p, backend


def run(x_seq, v_init, decay, p: NeuronParams, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on ``prepare``'s arguments (for layers that validated once)."""
    if backend == "reference":
        spike, v_last, _ = reference.forward(x_seq, v_init, decay, p)
        return spike, v_last
    args = (x_seq, v_init, decay, *p.fields(), backend)
    if torch.compiler.is_compiling():  # the custom op, traced
        spike, v_last, _ = _neuron_forward(*args)
    elif torch.is_grad_enabled():  # eager: the op's body and autograd without its Python dispatch
        spike, v_last, _ = _EagerNeuron.apply(*args)
    else:  # no graph (e.g. inside BatchNormNeuronFunction), ~20 us less
        spike, v_last, _ = _forward(*args)
    return spike, v_last


def backward_from_input(grad_spike, grad_v_last, x_seq, v_init, decay, p: NeuronParams, backend: str,
                        need_grad_decay: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's gradients (x_seq, v_init, decay) from its INPUT alone, for callers that saved x_seq
    and not the forward's outputs (``cbp_kernels.nn.BatchNormNeuronFunction``). Arguments as
    ``run``'s; ``grad_spike`` / ``grad_v_last`` may be None (zero). The cpu backend's backward
    recomputes H from x_seq itself; the others rerun the forward for H and S first. No graph."""
    grad_spike, grad_v_last = _output_grads(grad_spike, grad_v_last, x_seq)
    if backend == "reference":
        return reference.backward(grad_spike, grad_v_last, None, None, x_seq, v_init, decay, p, need_grad_decay)
    args = p.fields()
    if backend in _RECOMPUTE_H:
        spike_seq = h_seq = x_seq.new_empty(0)
    else:
        spike_seq, _, h_seq = call(_neuron_forward, _forward, x_seq, v_init, decay, *args, backend)
    return call(_neuron_backward, _backward_kernels, grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay,
                *args, backend, need_grad_decay)
