"""cbp_kernels: fused kernels and the CBP quantizer for quantized spiking neural networks."""
from . import models, nn, ops, quant
from .ops._backend import BACKENDS, backends
from .export import load_packed, save_packed
from .memory import memory_report
from .nn import LIFConv2d, convert
from .ops.levels import LevelSet

__version__ = "0.1.0"
__all__ = ["ops", "nn", "quant", "models", "backends", "BACKENDS", "LIFConv2d", "convert", "memory_report",
           "load_packed", "save_packed", "LevelSet", "__version__"]
