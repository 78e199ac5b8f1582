"""Multi-step IF / LIF / PLIF neuron: ``multistep_neuron`` and its backends."""
from .op import multistep_neuron
from .params import NEURONS, SURROGATES, NeuronParams

__all__ = ["multistep_neuron", "NeuronParams", "NEURONS", "SURROGATES"]
