"""The ops: each with a plain-PyTorch ``reference`` and its kernels, one signature."""
from .constraint import constraint_pass, multiplier_step, quantize
from .neuron import multistep_neuron

__all__ = ["multistep_neuron", "constraint_pass", "multiplier_step", "quantize"]
from .bitconv import PackedWeight, pack_spikes, pack_weight, packed_conv2d, packed_conv2d_lif, packed_linear, unpack_weight  # noqa: E402
from .bitpack import bitpack, bitunpack  # noqa: E402

__all__ += ["bitpack", "bitunpack", "packed_conv2d", "packed_conv2d_lif", "packed_linear", "pack_spikes", "pack_weight", "unpack_weight", "PackedWeight"]
