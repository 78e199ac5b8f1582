"""The ResNet stem's max pooling (3x3, stride 2, padding 1) with an int16 argmax, bit for bit
ATen's: ``max_pool2d_3x3s2`` and its ``max_pool2d_3x3s2_backward``."""
from .op import has_cpu_kernel, max_pool2d_3x3s2, max_pool2d_3x3s2_backward, supported

__all__ = ["has_cpu_kernel", "max_pool2d_3x3s2", "max_pool2d_3x3s2_backward", "supported"]
