"""Modules built on the ops: spiking neurons (and, as they land, layers)."""
from .convert import convert
from .lifconv import LIFConv2d
from .neuron import IF, LIF, PLIF

__all__ = ["IF", "LIF", "PLIF", "LIFConv2d", "convert"]
from .quantized import QuantConv2d, QuantLinear

__all__ += ["QuantConv2d", "QuantLinear"]
from .packed import PackedConv2d, PackedLinear  # noqa: E402

__all__ += ["PackedConv2d", "PackedLinear"]
