// The C++ entry point of the ResNet stem's max pooling, declared once; CPU only
// (csrc/cpu/max_pool.cpp): on CUDA ATen's own kernel reads NCHW directly. Schema:
// csrc/common/op_schema.h.
//   max_pool2d_3x3s2(x) -> (y, argmax): x float32 [B, H, W] contiguous (B = N * C planes,
//     H * W <= 2^15), kernel 3x3, stride 2, padding 1, dilation 1, floor mode:
//     y float32 [B, OH, OW], OH = (H - 1) / 2 + 1 (OW alike), y[b, i, j] = max of x[b] over
//     rows 2i-1..2i+1 and columns 2j-1..2j+1 inside the plane; argmax int16 [B, OH, OW] its
//     plane-local index h * W + w: the first maximum in row-major window order, a NaN taken
//     wherever it comes (the last NaN), bitwise aten::max_pool2d_with_indices' values and
//     indices (its update rule: val > max || isnan(val), from -inf at the first valid index).
//   max_pool2d_3x3s2_backward(grad_y, argmax, height, width) -> grad_x: grad_y float32 and argmax
//     int16 [B, OH, OW] contiguous (the forward's) -> grad_x float32 [B, height, width], each cell
//     the sum of the gradients of the outputs whose argmax it is, added in output order from
//     0: bitwise aten::max_pool2d_with_indices_backward (which zero-fills and scatter-adds in
//     that order); here each cell gathers its at most four windows, written once.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/op_schema.h"

namespace cbp {

struct MaxPool2d3x3s2Op {
  static constexpr const char* name = "max_pool2d_3x3s2";
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x);
  static constexpr std::array<const char*, 1> args{"x"};
};
MaxPool2d3x3s2Op::Fn max_pool2d_3x3s2_cpu;

struct MaxPool2d3x3s2BackwardOp {
  static constexpr const char* name = "max_pool2d_3x3s2_backward";
  using Fn = at::Tensor(const at::Tensor& grad_y, const at::Tensor& argmax, int64_t height, int64_t width);
  static constexpr std::array<const char*, 4> args{"grad_y", "argmax", "height", "width"};
};
MaxPool2d3x3s2BackwardOp::Fn max_pool2d_3x3s2_backward_cpu;

}  // namespace cbp
