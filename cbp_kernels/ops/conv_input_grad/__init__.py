"""The input gradient of a convolution on AMX-BF16, ``conv_input_grad``: exact products for weights
exact in bfloat16 (CBP's levels, the scale as ``alpha``), three bfloat16 parts for other float32
weights; and ``conv2d_integer_input``, a stride-1 convolution of integer inputs (spikes) on the
same kernel."""
from .op import conv2d_integer_input, conv_input_grad, has_cpu_kernel, split_bf16

__all__ = ["conv2d_integer_input", "conv_input_grad", "has_cpu_kernel", "split_bf16"]
