"""Bit-packed popcount convolution / linear for binary and ternary weights on {0,1} spikes."""
from .op import pack_spikes, packed_conv2d, packed_conv2d_lif, packed_linear
from .weight import PackedWeight, infer_levels, pack_codes, pack_weight, unpack_codes, unpack_weight, weight_levels

__all__ = [
    "packed_conv2d", "packed_conv2d_lif", "packed_linear", "pack_spikes", "PackedWeight", "pack_weight", "unpack_weight",
    "weight_levels", "infer_levels", "pack_codes", "unpack_codes",
]
