// The C++ entry point of the batch-norm statistics, declared once; CPU only (csrc/cpu/batch_norm_stats.cpp):
// it reproduces ATen's CPU arithmetic bit for bit, and CUDA tensors keep ATen's own
// native_batch_norm (whose CUDA statistics are another arithmetic). Schema: csrc/common/op_schema.h.
//   batch_norm_stats(x, running_mean, running_var, momentum, eps) -> [mean, invstd]: x [N, C, *]
//     float32 contiguous (NCHW); mean / invstd float32 [C], bitwise the second and third outputs
//     of aten::native_batch_norm(x, ..., training=True, momentum, eps); running_mean /
//     running_var float32 [C] or None, updated in place exactly as that op updates them.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/op_schema.h"

namespace cbp {

struct BatchNormStatsOp {
  static constexpr const char* name = "batch_norm_stats";
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, double momentum,
                                                double eps);
  static constexpr std::array<const char*, 5> args{"x", "running_mean!", "running_var!", "momentum", "eps"};
};
BatchNormStatsOp::Fn batch_norm_stats_cpu;

}  // namespace cbp
