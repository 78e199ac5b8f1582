// Scalar math of the differentiable sigmoid-sum quantizer (Quantization Networks, CVPR 2019,
// as used for SNNs by seed paper 001), shared by the C++ and CUDA kernels:
//   y = alpha * (sum_i s_i * sig(z_i) - o),   z_i = T * (beta * w - b_i)
// n = |levels| - 1 sigmoids; s_i = level gaps, b_i = midpoints, o = sum(s_i) / 2.
// sig(z) in the stable form: e = exp(-|z|) in (0, 1] never overflows, sig = 1 / (1 + e) for
// z >= 0 and e / (1 + e) below, sig'(z) = sig(z) sig(-z) = e / (1 + e)^2 (exact where
// sig * (1 - sig) would round to 0). No clamp of z: the gradient never drops to 0 at |z| = 10
// (the paper's sigmoid; its public code's clamp to [-10, 10] zeroes it beyond).
// Derivatives:
//   dy/dw     = alpha * beta * T * sum_i s_i sig'(z_i)
//   dy/dbeta  = alpha * w * T    * sum_i s_i sig'(z_i)
//   dy/dalpha = sum_i s_i sig_i - o
// e = exp_f32(-|z|) (common/exp_math.h): the CPU and CUDA kernels round alike.
#pragma once

#include "common/exp_math.h"
#include "common/hd.h"

namespace cbp {

constexpr int kMaxSigmoids = 16;  // up to 17 levels (4-bit); checked in Python

struct SigmoidSum {
  float value;  // sum_i s_i sig_i - o
  float slope;  // sum_i s_i sig'(z_i)
};

CBP_HD SigmoidSum sigmoid_sum(float w, float beta, float temperature, const float* gaps, const float* mids, int n,
                              float offset) {
  SigmoidSum r{0.0f, 0.0f};
  for (int i = 0; i < n; ++i) {
    const float z = temperature * (beta * w - mids[i]);
    const float e = exp_f32(-fabsf(z));
    const float sig = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    r.value += gaps[i] * sig;
    r.slope += gaps[i] * (e / ((1.0f + e) * (1.0f + e)));
  }
  r.value -= offset;
  return r;
}

}  // namespace cbp
