"""The CBP constraint: ``quantize`` (Q with a straight-through gradient), the fused
multi-tensor ``constraint_pass`` and ``multiplier_step`` (the Adam / AdamW ascent of the
multipliers, also one multi-tensor pass); the math is ``reference.py`` (``reference.cs`` elementwise).
``level_table`` builds the per-layer constants (levels, midpoints, window edges) they all share."""
from . import reference
from .op import constraint_pass, multiplier_step, quantize
from .reference import level_table

__all__ = ["constraint_pass", "multiplier_step", "quantize", "level_table", "reference"]
