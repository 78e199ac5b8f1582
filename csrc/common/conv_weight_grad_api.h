// The C++ entry point of the convolution's weight gradient on integer inputs, declared once;
// CPU only (csrc/cpu/conv_weight_grad.cpp): on CUDA the layers keep cuDNN. Schema:
// csrc/common/op_schema.h.
//   conv_weight_grad(grad_y, x, kernel_size, stride, padding) -> grad_w: grad_y float32
//     [N, O, OH, OW] and x [N, C, H, W], both contiguous, x float32 with values exact in
//     bfloat16 (spikes, small integers: a precondition, not checked) or uint8, groups 1, dilation 1,
//     OH = (H + 2 * pad_h - KH) / stride_h + 1 (OW alike) -> grad_w float32 [O, C, KH, KW],
//       grad_w[o, c, kh, kw] = sum_{n, oh, ow} grad_y[n, o, oh, ow] * x[n, c, oh*sh + kh - ph, ow*sw + kw - pw]
//     (x zero outside its plane): aten::convolution_backward's weight gradient, with float32
//     accumulation in another order.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "common/op_schema.h"

namespace cbp {

struct ConvWeightGradOp {
  static constexpr const char* name = "conv_weight_grad";
  using Fn = at::Tensor(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding);
  static constexpr std::array<const char*, 5> args{"grad_y", "x", "kernel_size", "stride", "padding"};
};
ConvWeightGradOp::Fn conv_weight_grad_cpu;

}  // namespace cbp
