"""The input gradient of a convolution whose weights are exact in bfloat16 (CBP's levels, the
scale as ``alpha``), exact products on AMX-BF16: ``conv_input_grad``."""
from .op import conv_input_grad, has_cpu_kernel, split_bf16

__all__ = ["conv_input_grad", "has_cpu_kernel", "split_bf16"]
