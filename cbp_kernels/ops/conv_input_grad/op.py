"""The public input-gradient op of a convolution: validation, backend choice, the torch.library
custom op (with its fake for torch.compile).

``conv_input_grad(grad_y, weight, input_size, stride, padding, alpha)`` is
``alpha * aten.convolution_backward(grad_y, x, weight, ...)``'s input gradient (groups 1,
dilation 1); ``weight_sign=True`` uses sign(weight) instead of the weight (CBP's levels q of
Q(W) = s * q, taken as the kernel reads the weight: no tensor of them is written). On CPUs with AMX-BF16 (Sapphire Rapids and later) the C++ kernel splits grad_y
exactly into three bfloat16 parts (``split_bf16``) and sums the products with TDPBF16PS in
float32:
- a weight exact in bfloat16 (CBP's levels q in {-1, 0, 1}; the layer's scale s comes as
  ``alpha``, applied once to the float32 sum) is its own one part: 3 exact products per
  multiply-add, as accurate as ATen's float32 (the same exact products, summed in another order),
  not bitwise equal to it;
- any other float32 weight is split by the same rule into three parts and the pairs g_i w_j with
  i + j <= 4 are summed (6 products); the dropped g2 w3 + g3 w2 + g3 w3 are below 2^-21 |g w| per
  product, so the result is within float32's summation error plus 2^-21 alpha sum |g| |w|.
The choice is made per call by checking the weight. A CPU without AMX-BF16 or
``CBP_KERNELS_NO_AMX=1`` run ATen's float32 call inside the same op. CPU only: on CUDA the layer
keeps cuDNN.

``conv2d_integer_input(x, weight, padding)`` is ATen's stride-1 ``conv2d`` on the same kernel: the
input gradient of a convolution whose weight is ``weight`` transposed and flipped (read in place).
For x exact in bfloat16 (spikes, SEW ADD sums) x's parts 2 and 3 are zero and skipped: a float32
weight's three parts, 3 exact products per multiply-add summed in float32 (another order than
oneDNN's, as accurate); other x as float grad_y above. Without AMX-BF16, ``aten::conv2d`` itself.
"""
from __future__ import annotations

import torch

from .._backend import _available, call, kernels, resolve_backend
from ..utils import check_finite, check_pair, check_tensor

__all__ = ["conv2d_integer_input", "conv_input_grad", "has_cpu_kernel", "split_bf16"]


def _grad(grad_y: torch.Tensor, weight: torch.Tensor, input_size: list[int], stride: list[int], padding: list[int],
          alpha: float, weight_sign: bool, backend: str) -> torch.Tensor:
    return kernels(__package__, backend).conv_input_grad(grad_y, weight, input_size, stride, padding, alpha,
                                                         weight_sign)


_conv_input_grad = torch.library.custom_op("cbp_kernels::conv_input_grad", _grad, mutates_args=())


@_conv_input_grad.register_fake
def _(grad_y, weight, input_size, stride, padding, alpha, weight_sign, backend):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1], *input_size)


def _conv(x: torch.Tensor, weight: torch.Tensor, padding: list[int], backend: str) -> torch.Tensor:
    return kernels(__package__, backend).conv2d_integer_input(x, weight, padding)


_conv2d_integer_input = torch.library.custom_op("cbp_kernels::conv2d_integer_input", _conv, mutates_args=())


@_conv2d_integer_input.register_fake
def _(x, weight, padding, backend):
    return x.new_empty(x.shape[0], weight.shape[0], *(x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i] + 1
                                                      for i in range(2)))


def _check_operands(name: str, t: torch.Tensor, layout: str, weight: torch.Tensor, dim: int) -> None:
    """float32 CPU 4-D ``t`` (``layout``) and weight ``[O, C, KH, KW]``, t's channels the weight's
    dim ``dim`` (O: 0, C: 1)."""
    check_tensor(name, t, dtypes=(torch.float32,))
    check_tensor("weight", weight, dtypes=(torch.float32,))
    if t.dim() != 4 or weight.dim() != 4 or weight.shape[dim] != t.shape[1]:
        raise ValueError(f"{name} {layout} and weight [O, C, KH, KW] must be 4-D with one {'OC'[dim]}, got "
                         f"{tuple(t.shape)} and {tuple(weight.shape)}")
    if t.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"{name} and weight must be CPU tensors, got {t.device} and {weight.device}")


def has_cpu_kernel() -> bool:
    """Whether the extension holds the CPU kernel."""
    return _available("conv_input_grad", "cpu", "cpu", __package__)


def split_bf16(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's exact split of float32 ``g`` (grad_y, and a weight not exact in bfloat16)
    into three bfloat16 parts, g = g1 + g2 + g3:
    g1 = g with its low 16 bits cleared (truncation), g2 the same of g - g1, g3 = g - g1 - g2,
    each subtraction exact in float32; 8 + 8 + 8 significant bits cover float32's 24, so g3 is
    exact in bfloat16 while it is normal; |g2| + |g3| < 2^-7 |g|, |g3| < 2^-15 |g|. AMX reads
    bfloat16 denormals (below 2^-126) as 0: |g| >= 2^-102 splits with every part normal or 0; below, the parts under 2^-126 are lost.
    Non-finite g gives NaN parts (inf - inf)."""
    parts = []
    rest = g.to(torch.float32)
    for _ in range(3):
        part = (rest.view(torch.int32) & -65536).view(torch.float32)  # -65536 = 0xFFFF0000
        parts.append(part.to(torch.bfloat16))
        rest = rest - part
    return tuple(parts)


def conv_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, input_size, stride, padding, alpha: float = 1.0,
                    backend: str = "auto", *, weight_sign: bool = False) -> torch.Tensor:
    """The input gradient of ``conv2d(x, alpha * weight, stride=stride, padding=padding)``
    (groups 1, dilation 1): ``grad_x[n, c, ih, iw] = alpha * sum_{o, kh, kw} grad_y[n, o, oh, ow]
    * weight[o, c, kh, kw]`` over ``ih = oh * sh - ph + kh``, ``iw = ow * sw - pw + kw``.

    Args:
        grad_y: float32 CPU ``[N, O, OH, OW]`` (made contiguous), the output's gradient.
        weight: float32 CPU ``[O, C, KH, KW]`` (made contiguous); exact in bfloat16 (e.g. the
            levels {-1, 0, 1}: 3 products per multiply-add) or not (6 products, see above).
        input_size: (H, W) of the input; OH = (H + 2 ph - KH) // sh + 1 and OW alike.
        stride, padding: pairs (sh, sw) >= 1, (ph, pw) >= 0 (or one int for both).
        alpha: finite float applied once to each float32 sum (the layer's scale s).
        backend: "auto", "cpu" or "reference".
        weight_sign: use sign(weight) (+-1, 0) in the weight's place: for a CBP weight Q(W) =
            s * q (s > 0) its levels q, with ``alpha`` = s.

    Returns:
        grad_x float32 ``[N, C, H, W]``.
    """
    _check_operands("grad_y", grad_y, "[N, O, OH, OW]", weight, 0)
    size, s = check_pair("input_size", input_size, 1), check_pair("stride", stride, 1)
    p = check_pair("padding", padding, 0)
    expected = [(size[i] + 2 * p[i] - weight.shape[2 + i]) // s[i] + 1 for i in range(2)]
    if list(grad_y.shape[2:]) != expected or min(expected) < 1:
        raise ValueError(f"grad_y's (OH, OW) {tuple(grad_y.shape[2:])} do not follow from input_size {size}, kernel "
                         f"{tuple(weight.shape[2:])}, stride {s} and padding {p}: expected {tuple(expected)}")
    alpha = check_finite("alpha", alpha)
    backend = resolve_backend(backend, "conv_input_grad", grad_y.device, __package__)
    if not isinstance(weight_sign, bool):
        raise TypeError(f"weight_sign must be a bool, got {type(weight_sign).__name__}")
    return call(_conv_input_grad, _grad, grad_y.contiguous(), weight.contiguous(), size, s, p, alpha, weight_sign,
                backend)


def conv2d_integer_input(x: torch.Tensor, weight: torch.Tensor, padding=0, backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding)`` (stride 1, groups 1, dilation 1, no bias) on the
    input gradient's AMX-BF16 kernel (see the module's docstring): for the spiking layers' float
    weights on spikes / SEW sums.

    Args:
        x: float32 CPU ``[N, C, H, W]`` (made contiguous); exact in bfloat16 for the fast path
            (integers up to 256: 1 x part), any float32 otherwise (3 parts, as grad_y).
        weight: float32 CPU ``[O, C, KH, KW]`` (made contiguous).
        padding: int or pair (ph, pw), 0 <= ph < KH, 0 <= pw < KW.
        backend: "auto", "cpu" or "reference".

    Returns:
        float32 ``[N, O, H + 2 ph - KH + 1, W + 2 pw - KW + 1]``.
    """
    _check_operands("x", x, "[N, C, H, W]", weight, 1)
    p = check_pair("padding", padding, 0)
    kernel = weight.shape[2:]
    if p[0] >= kernel[0] or p[1] >= kernel[1]:
        raise ValueError(f"padding {p} must be smaller than the kernel {tuple(kernel)}")
    if min(x.shape[2 + i] + 2 * p[i] - kernel[i] + 1 for i in range(2)) < 1:
        raise ValueError(f"x's (H, W) {tuple(x.shape[2:])} with padding {p} are smaller than the kernel {tuple(kernel)}")
    backend = resolve_backend(backend, "conv_input_grad", x.device, __package__)
    return call(_conv2d_integer_input, _conv, x.contiguous(), weight.contiguous(), p, backend)
