"""cbp_kernels: fused kernels and the CBP quantizer for quantized spiking neural networks."""
from . import models, nn, ops, quant
from .memory import memory_report
from .nn import LIFConv2d, convert
from ._backend import BACKENDS, backends

__version__ = "0.1.0"
__all__ = ["ops", "nn", "quant", "backends", "BACKENDS", "__version__", "models", "LIFConv2d", "convert",
           "memory_report"]
from .export import load_packed, save_packed  # noqa: E402  (cbp-quantize's export format)

__all__ += ["load_packed", "save_packed"]
