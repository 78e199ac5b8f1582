// The C++ entry point of the input gradient of a convolution (weights exact in bfloat16, e.g.
// CBP's levels q in {-1, 0, 1} with the scale s passed as alpha, or any float32), declared once;
// CPU only (csrc/cpu/conv_input_grad.cpp): on CUDA the layer keeps cuDNN. Schema:
// csrc/common/op_schema.h.
//   conv_input_grad(grad_y, weight, input_size, stride, padding, alpha, weight_sign) -> grad_x:
//     grad_y float32 [N, O, OH, OW] contiguous, weight float32 [O, C, KH, KW] contiguous,
//     input_size (H, W), stride (sh, sw) >= 1, padding (ph, pw) >= 0 (groups 1, dilation 1),
//     OH = (H + 2 ph - KH) / sh + 1 (OW alike) -> grad_x float32 [N, C, H, W],
//       grad_x[n, c, ih, iw] = alpha * sum_{o, kh, kw : ih = oh*sh - ph + kh, iw = ow*sw - pw + kw}
//                              grad_y[n, o, oh, ow] * weight[o, c, kh, kw]
//     (alpha applied once to the float32 sum): alpha * aten::convolution_backward's input
//     gradient. weight_sign: sign(weight) in its place (read as the kernel prepares its tiles:
//     the levels q of a CBP weight Q(W) = s * q, s > 0, without a pass that writes them). AMX-BF16 where the CPU allows it, else that ATen call: a weight exact in
//     bfloat16 gives exact products with float32 accumulation in another order than ATen's;
//     any other weight, split into three bfloat16 parts, is within 2^-21 alpha sum |g| |w| more
//     (the pairs of parts dropped, csrc/cpu/conv_input_grad.cpp).
//   conv2d_integer_input(x, weight, padding) -> y: the same kernel as a stride-1 convolution,
//     x float32 [N, C, H, W] contiguous, weight float32 [O, C, KH, KW] contiguous, padding
//     (ph, pw) with 0 <= ph < KH, 0 <= pw < KW (groups 1, dilation 1, no bias) -> y float32
//     [N, O, H + 2 ph - KH + 1, W + 2 pw - KW + 1] = aten::conv2d(x, weight, padding): the
//     input gradient of a convolution whose weight is `weight` transposed and flipped, padding
//     K - 1 - p. For x exact in bfloat16 (spikes, SEW sums) the kernel skips x's parts 2 and 3:
//     a float32 weight's three parts times x, every product exact, float32 sums in another
//     order than ATen's. AMX-BF16 where the CPU allows it, else aten::conv2d itself.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "common/op_schema.h"

namespace cbp {

struct ConvInputGradOp {
  static constexpr const char* name = "conv_input_grad";
  using Fn = at::Tensor(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, double alpha, bool weight_sign);
  static constexpr std::array<const char*, 7> args{"grad_y", "weight", "input_size", "stride", "padding", "alpha",
                                                   "weight_sign"};
};
ConvInputGradOp::Fn conv_input_grad_cpu;

struct Conv2dIntegerInputOp {
  static constexpr const char* name = "conv2d_integer_input";
  using Fn = at::Tensor(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding);
  static constexpr std::array<const char*, 3> args{"x", "weight", "padding"};
};
Conv2dIntegerInputOp::Fn conv2d_integer_input_cpu;

}  // namespace cbp
