"""Modules built on the ops: spiking neurons (and, as they land, layers)."""
from .neuron import IF, LIF, PLIF

__all__ = ["IF", "LIF", "PLIF"]
from .quantized import QuantConv2d, QuantLinear

__all__ += ["QuantConv2d", "QuantLinear"]
