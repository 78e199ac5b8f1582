// The C++ entry points of the bit-packed popcount convolution, declared once for the CPU
// (csrc/cpu/bitconv.cpp) and CUDA (csrc/cuda/bitconv.cu) kernels; schemas and checks:
// csrc/common/op_schema.h. Equations: csrc/common/bitconv_math.h.
//   bitconv2d(x, planes, scale, bias, stride, padding, dilation, groups) -> out:
//     x int32 [N, H, W, G*Wg] packed NHWC spikes, planes int32 [P, O, KH, KW, Wg] (P = 1 binary,
//     2 ternary), bias float32 [O] or None -> out float32 [N, OH, OW, O].
//   bitconv2d_lif(x, planes, mul, add, stride, padding, dilation, groups, T, decay, v_threshold,
//                 v_reset, soft_reset, kind, decay_input) -> (spikes, v_last):
//     x int32 [T*Nb, H, W, G*Wg] (t major), mul / add float32 [O] -> spikes int32
//     [T*Nb, OH, OW, ceil(O/32)], v_last float32 [Nb, OH, OW, O].
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/op_schema.h"

namespace cbp {

struct Bitconv2dOp {
  static constexpr const char* name = "bitconv2d";
  using Fn = at::Tensor(const at::Tensor& x, const at::Tensor& planes, double scale,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups);
  static constexpr std::array<const char*, 8> args{"x", "planes", "scale", "bias", "stride", "padding", "dilation",
                                                   "groups"};
};
Bitconv2dOp::Fn bitconv2d_cpu, bitconv2d_cuda;

struct Bitconv2dLifOp {
  static constexpr const char* name = "bitconv2d_lif";
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& mul,
                                                const at::Tensor& add, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                int64_t T, double decay, double v_threshold, double v_reset,
                                                bool soft_reset, int64_t kind, bool decay_input);
  static constexpr std::array<const char*, 15> args{"x",      "planes",   "mul",         "add",     "stride",
                                                    "padding", "dilation", "groups",      "T",       "decay",
                                                    "v_threshold", "v_reset", "soft_reset", "kind", "decay_input"};
};
Bitconv2dLifOp::Fn bitconv2d_lif_cpu, bitconv2d_lif_cuda;

}  // namespace cbp
