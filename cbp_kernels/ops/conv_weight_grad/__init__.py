"""The weight gradient of a convolution on integer inputs (spikes, SEW sums) on the CPU's
AMX-BF16 tile unit, as accurate as float32: ``conv_weight_grad``."""
from .op import conv_weight_grad, has_cpu_kernel

__all__ = ["conv_weight_grad", "has_cpu_kernel"]
