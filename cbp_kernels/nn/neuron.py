"""Spiking-neuron modules that replace SpikingJelly's ``IFNode``, ``LIFNode`` and
``ParametricLIFNode`` in an existing model: same constructor arguments, ``step_mode``
(``"m"``: input ``[T, *]``; ``"s"``: one step ``[*]``), membrane state ``v`` kept between
calls until ``reset()``. Each call runs ``cbp_kernels.ops.multistep_neuron``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.neuron.op import prepare, run

__all__ = ["IF", "LIF", "PLIF", "surrogate_name"]

# SpikingJelly surrogate classes -> our surrogate names.
_SJ_SURROGATES = {"ATan": "atan", "Sigmoid": "sigmoid", "Rect": "rectangle", "PiecewiseQuadratic": "piecewise_quadratic"}


def surrogate_name(surrogate) -> tuple[str, float | None]:
    """(name, alpha) of a surrogate given by name or as a SpikingJelly surrogate object."""
    if isinstance(surrogate, str):
        return surrogate, None
    name = _SJ_SURROGATES.get(type(surrogate).__name__)
    if name is None:
        raise ValueError(f"unsupported surrogate function {surrogate!r}; supported: {sorted(_SJ_SURROGATES)}")
    return name, float(surrogate.alpha)


class _Neuron(nn.Module):
    _neuron = "lif"

    def __init__(self, v_threshold=1.0, v_reset=0.0, surrogate_function="atan", detach_reset=False,
                 step_mode="s", backend="auto", decay_input=True, alpha=None):
        super().__init__()
        if step_mode not in ("s", "m"):
            raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
        self.v_threshold, self.v_reset = v_threshold, v_reset
        self.surrogate, sj_alpha = surrogate_name(surrogate_function)
        self.alpha = alpha if alpha is not None else sj_alpha
        self.detach_reset, self.step_mode, self.backend, self.decay_input = detach_reset, step_mode, backend, decay_input
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        """Forgets the membrane state (call between samples, as SpikingJelly's functional.reset_net)."""
        self.v = None

    def _tau(self):
        return 2.0

    def prepared(self, x_seq: torch.Tensor) -> tuple:
        """``ops.neuron.op.prepare``'s checked (v_init, decay, params, backend) for the multi-step
        input ``x_seq`` ``[T, *]`` with this module's settings and state (v_init: the state ``v``
        when it fits x_seq, else the default)."""
        v_init = self.v if self.v is not None and self.v.shape == x_seq.shape[1:] else None
        return prepare(x_seq, v_init, neuron=self._neuron, tau=self._tau(), v_threshold=self.v_threshold,
                       v_reset=self.v_reset, decay_input=self.decay_input, detach_reset=self.detach_reset,
                       surrogate=self.surrogate, alpha=self.alpha, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0) if self.step_mode == "s" else x
        spike, self.v = run(x_seq, *self.prepared(x_seq))
        return spike[0] if self.step_mode == "s" else spike

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate}, "
                f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, backend={self.backend}")


class IF(_Neuron):
    """Integrate-and-fire: H[t] = V[t-1] + X[t]. Replaces ``spikingjelly...neuron.IFNode``."""

    _neuron = "if"

    def __init__(self, v_threshold=1.0, v_reset=0.0, surrogate_function="atan", detach_reset=False,
                 step_mode="s", backend="auto", alpha=None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, alpha=alpha)


class LIF(_Neuron):
    """Leaky integrate-and-fire with time constant ``tau``. Replaces ``LIFNode``."""

    _neuron = "lif"

    def __init__(self, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate_function="atan",
                 detach_reset=False, step_mode="s", backend="auto", alpha=None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, decay_input, alpha)
        self.tau = tau

    def _tau(self):
        return self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class PLIF(_Neuron):
    """Parametric LIF: learns ``w`` with tau = 1 / sigmoid(w), initialised at ``init_tau``
    (SpikingJelly's ``ParametricLIFNode``, same parameter name ``w``, so state dicts load)."""

    _neuron = "plif"

    def __init__(self, init_tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate_function="atan",
                 detach_reset=False, step_mode="s", backend="auto", alpha=None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, decay_input, alpha)
        if not init_tau > 1:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def _tau(self):
        return 1.0 / self.w.sigmoid()

    def extra_repr(self) -> str:
        return f"tau={float(1 / self.w.detach().sigmoid()):.4f}, decay_input={self.decay_input}, " + super().extra_repr()
