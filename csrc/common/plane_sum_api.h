// The C++ entry point of the integer forward's epilogue (cbp_kernels/nn/integer_forward.py),
// declared once; CPU only (csrc/cpu/plane_sum.cpp): on CUDA the torch code runs. Schema:
// csrc/common/op_schema.h.
//   plane_sum_nchw(counts, planes, scale) -> out: counts float32 [P * N, OH, OW, O] contiguous
//     (P = planes in 1..8 bit planes stacked along the batch, the popcount conv's exact counts),
//     scale a float32 one-element tensor s; out float32 [N, O, OH, OW] contiguous (NCHW),
//       out[n, o, h, w] = float32(sum_{b < P} 2^b * counts[b * N + n, h, w, o]) * s,
//     the sum exact (integers below 2^24), the product rounded once: bitwise the torch code
//     c = counts[:N]; c = c + 2^b * counts[bN:(b+1)N] ...; c.permute(0, 3, 1, 2) * s.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "common/op_schema.h"

namespace cbp {

struct PlaneSumNchwOp {
  static constexpr const char* name = "plane_sum_nchw";
  using Fn = at::Tensor(const at::Tensor& counts, int64_t planes, const at::Tensor& scale);
  static constexpr std::array<const char*, 3> args{"counts", "planes", "scale"};
};
PlaneSumNchwOp::Fn plane_sum_nchw_cpu;

}  // namespace cbp
