"""Bit packing of {0,1} tensors into 32-bit words: ``bitpack`` / ``bitunpack`` and their backends."""
from .op import WORD_BITS, bitpack, bitunpack, pack_bits, packed_size

__all__ = ["bitpack", "bitunpack", "pack_bits", "packed_size", "WORD_BITS"]
