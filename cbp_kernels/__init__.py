"""cbp_kernels: fused kernels and the CBP quantizer for quantized spiking neural networks."""
from . import nn, ops, quant
from ._backend import BACKENDS, backends

__version__ = "0.1.0"
__all__ = ["ops", "nn", "quant", "backends", "BACKENDS", "__version__"]
