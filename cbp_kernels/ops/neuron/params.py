"""The neuron's non-tensor parameters, validated once by ``op.multistep_neuron`` and passed
whole to every backend. The custom ops' schemas take its fields in their order
(``p.fields()``) and give the backends ``NeuronParams(*fields)``: the identity, no field is
derived or renamed on the way."""
from __future__ import annotations

from dataclasses import dataclass, fields

NEURONS = {"if": 0, "lif": 1, "plif": 1}  # PLIF runs the LIF kernel; its decay gets a gradient
SURROGATES = {"atan": 0, "sigmoid": 1, "rectangle": 2, "triangle": 3, "piecewise_quadratic": 4}
# Default alpha of each surrogate (SpikingJelly's: ATan 2, Sigmoid 4, Rect 1, PiecewiseQuadratic 1).
DEFAULT_ALPHA = {"atan": 2.0, "sigmoid": 4.0, "rectangle": 1.0, "triangle": 1.0, "piecewise_quadratic": 1.0}


@dataclass(frozen=True)
class NeuronParams:
    """v_reset=None selects the soft reset (subtract v_threshold)."""

    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    kind: int = 1  # NEURONS value: 0 = IF, 1 = LIF/PLIF
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: int = 0  # SURROGATES value
    alpha: float = 2.0

    def fields(self) -> tuple:
        """The fields in order: the custom ops' scalar arguments (``NeuronParams(*p.fields()) == p``).
        Not ``dataclasses.astuple``, which deep-copies each field (~35 us a call)."""
        return tuple(getattr(self, name) for name in _FIELD_NAMES)

    @property
    def soft_reset(self) -> bool:
        return self.v_reset is None

    @property
    def reset_value(self) -> float:
        """V_reset in the charge and reset equations (0 for the soft reset)."""
        return 0.0 if self.v_reset is None else self.v_reset


_FIELD_NAMES = tuple(f.name for f in fields(NeuronParams))
