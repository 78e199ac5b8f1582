"""The ops: each with a plain-PyTorch ``reference`` and its kernels, one signature."""
from .neuron import multistep_neuron

__all__ = ["multistep_neuron"]
