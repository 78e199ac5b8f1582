// The C++ entry points of bit packing, declared once for the CPU (csrc/cpu/bitpack.cpp) and
// CUDA (csrc/cuda/bitpack.cu) kernels; schemas and checks: csrc/common/op_schema.h.
//   bitpack(x) -> (words, non_binary): x [B, R, C], any strides, bool / uint8 / any integer or
//     floating dtype -> words int32 [B, R, ceil(C/32)], bit b of word w = (x[.., .., 32w + b] != 0)
//     (LSB first, high bits of the last word 0); non_binary int64 0-dim: the count of values
//     other than 0 and 1 (cbp_kernels/ops/bitpack/op.py raises when it is not 0).
//   bitunpack(words, size, dtype) -> y: words int32 [R, W] contiguous -> y [R, size] of dtype,
//     y[r, c] = (words[r, c / 32] >> (c % 32)) & 1.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/op_schema.h"

namespace cbp {

struct BitpackOp {
  static constexpr const char* name = "bitpack";
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x);
  static constexpr std::array<const char*, 1> args{"x"};
};
BitpackOp::Fn bitpack_cpu, bitpack_cuda;

struct BitunpackOp {
  static constexpr const char* name = "bitunpack";
  using Fn = at::Tensor(const at::Tensor& words, int64_t size, at::ScalarType dtype);
  static constexpr std::array<const char*, 3> args{"words", "size", "dtype"};
};
BitunpackOp::Fn bitunpack_cpu, bitunpack_cuda;

}  // namespace cbp
