"""Bit-packed popcount convolution / linear for binary and ternary weights on {0,1} spikes."""
from .op import pack_spikes, packed_conv2d, packed_linear
from .weight import LEVELS, PackedWeight, infer_levels, pack_weight, unpack_weight, weight_levels

__all__ = [
    "packed_conv2d", "packed_linear", "pack_spikes", "PackedWeight", "pack_weight", "unpack_weight",
    "weight_levels", "infer_levels", "LEVELS",
]
