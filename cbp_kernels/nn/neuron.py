"""Spiking-neuron modules that replace SpikingJelly's ``IFNode``, ``LIFNode`` and
``ParametricLIFNode`` in an existing model: same constructor arguments, ``step_mode``
(``"m"``: input ``[T, *]``; ``"s"``: one step ``[*]``), membrane state ``v`` kept between
calls until ``reset()``. Each call runs ``cbp_kernels.ops.multistep_neuron``.

The defaults are SpikingJelly's: ``surrogate_function`` Sigmoid(alpha=4) (give ``"atan"``
or ``surrogate.ATan()`` for the paper's), ``store_v_seq=False`` (True: the membrane
potential after every step is kept in ``v_seq`` ``[T, *]`` in multi-step mode)."""
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

    def __init__(self, v_threshold=1.0, v_reset=0.0, surrogate_function="sigmoid", detach_reset=False,
                 step_mode="s", backend="auto", decay_input=True, alpha=None, store_v_seq=False):
        super().__init__()
        if step_mode not in ("s", "m"):
            raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
        self.v_threshold, self.v_reset = v_threshold, v_reset
        self.surrogate, sj_alpha = surrogate_name(surrogate_function)
        self.alpha = alpha if alpha is not None else sj_alpha
        self.detach_reset, self.step_mode, self.backend, self.decay_input = detach_reset, step_mode, backend, decay_input
        self.store_v_seq = store_v_seq
        self.v: torch.Tensor | None = None
        self.v_seq: torch.Tensor | None = None

    def reset(self) -> None:
        """Forgets the membrane state (call between samples, as SpikingJelly's functional.reset_net)."""
        self.v = self.v_seq = None

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
        if self.store_v_seq and self.step_mode == "m":  # one step at a time: V after each step
            spikes, v_seq = [], []
            for x_t in x_seq.split(1):
                spike, self.v = run(x_t, *self.prepared(x_t))
                spikes.append(spike)
                v_seq.append(self.v)
            self.v_seq = torch.stack(v_seq)
            return torch.cat(spikes)
        spike, self.v = run(x_seq, *self.prepared(x_seq))
        return spike[0] if self.step_mode == "s" else spike

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate}, "
                f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, backend={self.backend}"
                + (", store_v_seq=True" if self.store_v_seq else ""))


class IF(_Neuron):
    """Integrate-and-fire: H[t] = V[t-1] + X[t]. Replaces ``spikingjelly...neuron.IFNode``."""

    _neuron = "if"

    def __init__(self, v_threshold=1.0, v_reset=0.0, surrogate_function="sigmoid", detach_reset=False,
                 step_mode="s", backend="auto", alpha=None, store_v_seq=False):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, alpha=alpha,
                         store_v_seq=store_v_seq)


class LIF(_Neuron):
    """Leaky integrate-and-fire with time constant ``tau``. Replaces ``LIFNode``."""

    _neuron = "lif"

    def __init__(self, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate_function="sigmoid",
                 detach_reset=False, step_mode="s", backend="auto", alpha=None, store_v_seq=False):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, decay_input, alpha,
                         store_v_seq)
        self.tau = tau

    def _tau(self):
        return self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class PLIF(_Neuron):
    """Parametric LIF: learns ``w`` with tau = 1 / sigmoid(w), initialised at ``init_tau``
    (SpikingJelly's ``ParametricLIFNode``, same parameter name ``w``, so state dicts load)."""

    _neuron = "plif"

    def __init__(self, init_tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate_function="sigmoid",
                 detach_reset=False, step_mode="s", backend="auto", alpha=None, store_v_seq=False):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, decay_input, alpha,
                         store_v_seq)
        if not init_tau > 1:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def _tau(self):
        return 1.0 / self.w.sigmoid()

    def extra_repr(self) -> str:
        return f"tau={float(1 / self.w.detach().sigmoid()):.4f}, decay_input={self.decay_input}, " + super().extra_repr()
