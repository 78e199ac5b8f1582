"""The CBP constraint: ``quantize`` (Q with a straight-through gradient), the fused
multi-tensor ``constraint_pass`` and ``multiplier_step`` (the Adam / AdamW ascent of the
multipliers, also one multi-tensor pass); the math is ``reference.py`` (``reference.cs`` elementwise)."""
from . import reference
from .op import constraint_pass, multiplier_step, quantize

__all__ = ["constraint_pass", "multiplier_step", "quantize", "reference"]
