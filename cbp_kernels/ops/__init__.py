"""The ops: each with a plain-PyTorch ``reference`` and its kernels, one signature."""
from .constraint import constraint_pass, quantize
from .neuron import multistep_neuron

__all__ = ["multistep_neuron", "constraint_pass", "quantize"]
