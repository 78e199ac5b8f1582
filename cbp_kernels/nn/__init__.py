"""Modules built on the ops: spiking neurons, LIFConv2d, quantized and bit-packed layers."""
from .bn_neuron import BatchNormNeuronFunction, fold_batch_norm
from .clamp_quantize import ClampQuantize
from .convert import convert
from .lifconv import LIFConv2d, PackedLIFConv2d
from .neuron import IF, LIF, PLIF
from .pool import MaxPool2d
from .bitconv import PackedConv2d, PackedLinear
from .quantized import QuantConv2d, QuantLinear
from .sigmoid_quant import SigmoidQuantConv2d, SigmoidQuantLinear

__all__ = ["IF", "LIF", "PLIF", "LIFConv2d", "BatchNormNeuronFunction", "fold_batch_norm", "convert", "QuantConv2d",
           "QuantLinear", "PackedConv2d", "PackedLinear", "PackedLIFConv2d", "SigmoidQuantConv2d", "SigmoidQuantLinear",
           "ClampQuantize", "MaxPool2d"]
