// The C++ entry points of the CBP constraint ops, declared once for the CPU
// (csrc/cpu/constraint.cpp) and CUDA (csrc/cuda/constraint.cu) kernels; schemas and checks:
// csrc/common/op_schema.h ('!': written in place). Math: csrc/common/constraint_math.h; spec:
// cbp_kernels/ops/constraint/reference.py. table: float32 [L, 4, K] level constants per layer.
//   constraint_pass(weights, lambdas, table, grads!, lambda_grads!) -> float64 [2]:
//     (sum lambda * cs(w; g), sum cs(w)); grads += lambda * dcs/dw, lambda_grads = cs(w; g)
//     (each list empty when not wanted).
//   constraint_quantize(w, table) -> Q(w): table [1, 4, K].
//   constraint_multiplier_step(weights, lambdas!, exp_avgs!, exp_avg_sqs!, table, scalars):
//     one gradient-ascent Adam / AdamW step of every lambda on cs(w; g), in place; scalars
//     float32 [8] on the weights' device.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "common/op_schema.h"

namespace cbp {

struct ConstraintPassOp {
  static constexpr const char* name = "constraint_pass";
  using Fn = at::Tensor(at::TensorList weights, at::TensorList lambdas, const at::Tensor& table, at::TensorList grads,
                        at::TensorList lambda_grads);
  static constexpr std::array<const char*, 5> args{"weights", "lambdas", "table", "grads!", "lambda_grads!"};
};
ConstraintPassOp::Fn constraint_pass_cpu, constraint_pass_cuda;

struct ConstraintQuantizeOp {
  static constexpr const char* name = "constraint_quantize";
  using Fn = at::Tensor(const at::Tensor& w, const at::Tensor& table);
  static constexpr std::array<const char*, 2> args{"w", "table"};
};
ConstraintQuantizeOp::Fn constraint_quantize_cpu, constraint_quantize_cuda;

struct ConstraintMultiplierStepOp {
  static constexpr const char* name = "constraint_multiplier_step";
  using Fn = void(at::TensorList weights, at::TensorList lambdas, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, const at::Tensor& table, const at::Tensor& scalars);
  static constexpr std::array<const char*, 6> args{"weights", "lambdas!", "exp_avgs!", "exp_avg_sqs!", "table",
                                                   "scalars"};
};
ConstraintMultiplierStepOp::Fn constraint_multiplier_step_cpu, constraint_multiplier_step_cuda;

}  // namespace cbp
