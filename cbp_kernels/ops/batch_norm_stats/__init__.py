"""Batch-norm statistics bit for bit ATen's CPU ones: ``batch_norm_stats``."""
from .op import batch_norm_stats, supported

__all__ = ["batch_norm_stats", "supported"]
