"""Differentiable sigmoid-sum weight quantizer (the peer method of seed paper 001)."""
from .op import level_table, sigmoid_hard_quantize, sigmoid_quantize

__all__ = ["sigmoid_quantize", "sigmoid_hard_quantize", "level_table"]
