// Scalar math of the differentiable sigmoid-sum quantizer (Quantization Networks, CVPR 2019,
// as used for SNNs by seed paper 001), shared by the C++ and CUDA kernels:
//   y = alpha * (sum_i s_i * sig(z_i) - o),   z_i = clamp(T * (beta * w - b_i), -10, 10)
// n = |levels| - 1 sigmoids; s_i = level gaps, b_i = midpoints, o = sum(s_i) / 2.
// Derivatives (the clamp passes the gradient where |T (beta w - b_i)| <= 10):
//   dy/dw     = alpha * beta * T * sum_i s_i sig_i (1 - sig_i) [inside_i]
//   dy/dbeta  = alpha * w * T    * sum_i s_i sig_i (1 - sig_i) [inside_i]
//   dy/dalpha = sum_i s_i sig_i - o
// sig = 1 / (1 + exp_f32(-z)) (common/exp_math.h): the CPU and CUDA kernels round alike.
#pragma once

#include "common/exp_math.h"
#include "common/hd.h"

namespace cbp {

constexpr int kMaxSigmoids = 16;  // up to 17 levels (4-bit); checked in Python

struct SigmoidSum {
  float value;  // sum_i s_i sig_i - o
  float slope;  // sum_i s_i sig_i (1 - sig_i) [inside_i]
};

CBP_HD SigmoidSum sigmoid_sum(float w, float beta, float temperature, const float* gaps, const float* mids, int n,
                              float offset) {
  SigmoidSum r{0.0f, 0.0f};
  for (int i = 0; i < n; ++i) {
    const float z = temperature * (beta * w - mids[i]);
    const float zc = fminf(fmaxf(z, -10.0f), 10.0f);
    const float sig = 1.0f / (1.0f + exp_f32(-zc));
    r.value += gaps[i] * sig;
    if (z >= -10.0f && z <= 10.0f) r.slope += gaps[i] * sig * (1.0f - sig);
  }
  r.value -= offset;
  return r;
}

}  // namespace cbp
