"""The public weight-gradient op of a convolution on integer inputs: validation, backend
choice, the torch.library custom op (with its fake for torch.compile).

``conv_weight_grad(grad_y, x, kernel_size, stride, padding)`` is the weight gradient that
``aten.convolution_backward`` computes in float32 (groups 1, dilation 1), for an input x whose
values are exact in bfloat16: the spikes {0, 1} and small integer sums (SEW ADD: 0..2) that the
quantized layers see. The CPU kernel (csrc/cpu/conv_weight_grad.cpp) runs on the AMX-BF16 tile
unit: grad_y split exactly into three bfloat16 parts, each product with x exact, float32
accumulation: as accurate as float32 oneDNN, not bitwise equal to it (another summation
order). Where AMX-BF16 is not usable (no AMX, ``CBP_KERNELS_NO_AMX=1``) the kernel runs ATen's
float32 op itself. CPU only: on CUDA the layers keep cuDNN. The kernel keeps its scratch
between calls, per thread (the largest so far: O * C * KH * KW * 4 bytes of sums plus ~1 MiB
of operands; 10.5 MB for a 512 x 512 3 x 3 layer).
"""
from __future__ import annotations

import torch

from .._backend import _available, call, kernels, resolve_backend
from ..utils import check_pair, check_same_device, check_tensor

__all__ = ["conv_weight_grad", "has_cpu_kernel"]


def _wgrad(grad_y: torch.Tensor, x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
           backend: str) -> torch.Tensor:
    return kernels(__package__, backend).conv_weight_grad(grad_y, x, kernel_size, stride, padding)


_conv_weight_grad = torch.library.custom_op("cbp_kernels::conv_weight_grad", _wgrad, mutates_args=())


@_conv_weight_grad.register_fake
def _(grad_y, x, kernel_size, stride, padding, backend):
    return grad_y.new_empty(grad_y.shape[1], x.shape[1], *kernel_size)


def has_cpu_kernel() -> bool:
    """Whether the extension holds the CPU kernel (callers with a faster fallback than the
    reference use the op only then)."""
    return _available("conv_weight_grad", "cpu", "cpu", __package__)


def conv_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, kernel_size, stride=1, padding=0,
                     backend: str = "auto") -> torch.Tensor:
    """The weight gradient of ``conv2d(x, w, stride=stride, padding=padding)`` (groups 1,
    dilation 1, no bias) for the output gradient ``grad_y``:
    ``grad_w[o, c, kh, kw] = sum_{n, oh, ow} grad_y[n, o, oh, ow] * x[n, c, oh*sh + kh - ph, ow*sw + kw - pw]``
    (x zero outside its plane).

    Args:
        grad_y: float32 CPU ``[N, O, OH, OW]``, OH = (H + 2 * ph - KH) // sh + 1 (OW alike).
        x: CPU ``[N, C, H, W]``, float32 with values exact in bfloat16 (spikes, integers up to
            256 in magnitude: a precondition, not checked; the kernel truncates x to bfloat16),
            or uint8 (integers 0..255, e.g. a layer's saved 8-bit copy: 4x fewer bytes read).
        kernel_size, stride, padding: an int or a pair (KH, KW), (sh, sw) >= 1, (ph, pw) >= 0.
        backend: "auto", "cpu" or "reference" (ATen's float32 op).

    Returns:
        grad_w float32 ``[O, C, KH, KW]``: the float32 sum of the exact products in some order
        (as accurate as ATen's float32 op). On AMX, bfloat16 denormals read as zero: grad_y's
        parts below 2^-126 are lost (|grad_y| below ~2^-110 loses bits, below 2^-126 counts as 0)
        and |grad_w| below 2^-126 reads 0; a non-finite grad_y gives NaN where it reaches.
    """
    check_tensor("grad_y", grad_y, dtypes=(torch.float32,))
    check_tensor("x", x, dtypes=(torch.float32, torch.uint8))
    check_same_device("x", x, grad_y=grad_y)
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (on CUDA use aten.convolution_backward), got one on {x.device}")
    if x.dim() != 4 or grad_y.dim() != 4:
        raise ValueError(f"x and grad_y must be 4-D (NCHW), got shapes {tuple(x.shape)} and {tuple(grad_y.shape)}")
    k, s = check_pair("kernel_size", kernel_size, 1), check_pair("stride", stride, 1)
    p = check_pair("padding", padding, 0)
    N, C, H, W = x.shape
    out = [(H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1]
    if min(out) < 1 or list(grad_y.shape) != [N, grad_y.shape[1], *out]:
        raise ValueError(f"grad_y must have shape [{N}, O, {out[0]}, {out[1]}] (x {tuple(x.shape)}, kernel_size {k}, "
                         f"stride {s}, padding {p}), got {tuple(grad_y.shape)}")
    backend = resolve_backend(backend, "conv_weight_grad", x.device, __package__)
    return call(_conv_weight_grad, _wgrad, grad_y.contiguous(), x.contiguous(), k, s, p, backend)
