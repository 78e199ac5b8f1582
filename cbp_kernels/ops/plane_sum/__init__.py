"""The integer forward's epilogue: the popcount conv's bit-plane counts (NHWC) summed with their
powers of two and scaled, stored NCHW, in one pass: ``plane_sum_nchw``."""
from .op import has_cpu_kernel, plane_sum_nchw

__all__ = ["has_cpu_kernel", "plane_sum_nchw"]
