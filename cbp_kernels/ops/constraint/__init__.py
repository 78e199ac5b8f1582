"""The CBP constraint: ``quantize`` (Q with a straight-through gradient) and the fused
multi-tensor ``constraint_pass``; the math is ``reference.py`` (``reference.cs`` elementwise)."""
from . import reference
from .op import constraint_pass, quantize

__all__ = ["constraint_pass", "quantize", "reference"]
