// The C++ entry points of the sigmoid-sum quantizer, declared once for the CPU
// (csrc/cpu/sigmoid_quant.cpp) and CUDA (csrc/cuda/sigmoid_quant.cu) kernels; schemas and
// checks: csrc/common/op_schema.h. Equations: csrc/common/sigmoid_quant_math.h.
//   sigmoid_quant_forward(w, alpha, beta, gaps, mids, offset, temperature) -> y: w [*] float32 /
//     float16 / bfloat16, alpha / beta one float32, gaps / mids float32 [n <= kMaxSigmoids]
//     -> y with w's shape and dtype.
//   sigmoid_quant_backward(grad_y, w, alpha, beta, gaps, mids, offset, temperature)
//     -> [grad_w, grad_alpha, grad_beta]: grad_alpha / grad_beta float32 0-dim, summed in float64.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "common/op_schema.h"

namespace cbp {

struct SigmoidQuantForwardOp {
  static constexpr const char* name = "sigmoid_quant_forward";
  using Fn = at::Tensor(const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gaps,
                        const at::Tensor& mids, double offset, double temperature);
  static constexpr std::array<const char*, 7> args{"w", "alpha", "beta", "gaps", "mids", "offset", "temperature"};
};
SigmoidQuantForwardOp::Fn sigmoid_quant_forward_cpu, sigmoid_quant_forward_cuda;

struct SigmoidQuantBackwardOp {
  static constexpr const char* name = "sigmoid_quant_backward";
  using Fn = std::vector<at::Tensor>(const at::Tensor& grad_y, const at::Tensor& w, const at::Tensor& alpha,
                                     const at::Tensor& beta, const at::Tensor& gaps, const at::Tensor& mids,
                                     double offset, double temperature);
  static constexpr std::array<const char*, 8> args{"grad_y", "w",    "alpha",  "beta",
                                                   "gaps",   "mids", "offset", "temperature"};
};
SigmoidQuantBackwardOp::Fn sigmoid_quant_backward_cpu, sigmoid_quant_backward_cuda;

}  // namespace cbp
