// Scalar math of the CBP constraint, shared by the CPU (C++) and CUDA kernels. Plain C++ with
// no torch or CUDA runtime includes, so NVRTC (the CuPy backend) compiles it too. float32
// arithmetic whatever the storage dtype. The specification is
// cbp_kernels/ops/constraint/reference.py; per layer a table row holds, for K levels,
//   lv[K]   the scaled levels l_j = s*q_j
//   mid[K]  midpoints m_j = (l_j + l_{j+1})/2            (K-1 used)
//   wlo[K]  window left edges  m_j - d_j/(2g)             (K-1 used)
//   whi[K]  window right edges m_j + d_j/(2g)             (K-1 used)
// and, for a weight w:
//   Q(w)        = l_k, k = #{j : w >= m_j}                (a tie goes to the upper level)
//   in window   = exists j: wlo_j <= w < whi_j            (paper's eps -> 0+: [left, right))
//   cs(w)       = 2 |w - Q(w)|                            (windowless: 2 * distance to the nearest level)
//   cs(w; g)    = in window ? 0 : cs(w)
//   dcs/dw      = in window ? 0 : (w >= Q(w) ? +2 : -2)   (the right derivative)
#pragma once

#include "common/hd.h"

namespace cbp {

// Rows of one layer's table: [4][K] floats.
enum ConstraintRow : int { kLevels = 0, kMid = 1, kWindowLo = 2, kWindowHi = 3, kConstraintRows = 4 };

// Q(w) (returned) and keep = 0 inside an unconstrained window, 1 elsewhere (into *keep).
// Branch-free (selects on unconditionally loaded table values), so the CPU loop vectorises.
CBP_HD float constraint_select(float w, const float* row, int k, float* keep) {
  float q = row[kLevels * k];
  float kp = 1.0f;
  for (int j = 0; j + 1 < k; ++j) {
    const float mid = row[kMid * k + j], next = row[kLevels * k + j + 1];
    const float lo = row[kWindowLo * k + j], hi = row[kWindowHi * k + j];
    q = (w >= mid) ? next : q;
    kp = ((w >= lo) & (w < hi)) ? 0.0f : kp;
  }
  *keep = kp;
  return q;
}

// Windowless cs(w) = 2 |w - Q(w)| (NaN for NaN w, Inf for +-Inf w). The windowed cs(w; g) is
// free * keep (keep = 0 only for finite w, so no Inf * 0).
CBP_HD float constraint_free(float w, float q) { return 2.0f * fabsf(w - q); }

// dcs/dw(w; g): the right derivative.
CBP_HD float constraint_slope(float w, float q, float keep) { return ((w >= q) ? 2.0f : -2.0f) * keep; }


// ---- the multiplier update: one gradient-ASCENT Adam / AdamW step of lambda on cs(w; g) ----
// The op sequence of torch.optim.Adam(maximize=True)'s single-tensor path, every operation
// rounded once in float32 (no FMA; a correctly rounded sqrt). The step's scalars are computed
// on the host in double and rounded to float once (cbp_kernels/ops/constraint/reference.py,
// adam_scalars), in this order:
enum MultiplierScalar : int {
  kLerpWeight = 0,      // 1 - beta1
  kBeta2 = 1,           // beta2
  kOneMinusBeta2 = 2,   // 1 - beta2
  kBias2Sqrt = 3,       // sqrt(1 - beta2^step)
  kEps = 4,             // eps
  kNegStepSize = 5,     // -lr / (1 - beta1^step)
  kL2 = 6,              // weight_decay for Adam (L2 through the gradient), 0 for AdamW
  kDecay = 7,           // 1 - lr * weight_decay for AdamW (decoupled), 1 for Adam
  kMultiplierScalars = 8
};

// c ? a : b for a condition that is the same for every element (from a step scalar). On the
// CPU a bitwise blend: GCC turns a loop-invariant select into a branch, which stops the loop
// from vectorising; both a and b are computed anyway.
CBP_HD float uniform_select(bool c, float a, float b) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
  return c ? a : b;
#else
  const unsigned int mask = 0u - static_cast<unsigned int>(c);
  return __builtin_bit_cast(float, (__builtin_bit_cast(unsigned int, a) & mask) |
                                       (__builtin_bit_cast(unsigned int, b) & ~mask));
#endif
}

// One multiplier's Adam state (passed and returned by value: registers, vectorisable).
struct MultiplierState {
  float lam, m, v;
};

// One element: grad = -cs (maximize), [+ L2 * lam], lam *= decay,
//   m = lerp(m, grad, 1 - beta1)          (torch's two-sided lerp: m + w (grad - m) for w < 0.5,
//                                           grad - (grad - m)(1 - w) otherwise)
//   v = v * beta2 + ((1 - beta2) * grad) * grad
//   lam = lam + (-step_size * m) / (sqrt(v) / sqrt(1 - beta2^step) + eps)
CBP_HD MultiplierState multiplier_adam(float cs, const float* h, MultiplierState s) {
  const float l2 = h[kL2];
  const float with_l2 = -cs + l2 * s.lam;
  const float grad = uniform_select(l2 != 0.0f, with_l2, -cs);  // L2 only with weight decay: 0 * Inf would be NaN
  const float w1 = h[kLerpWeight];
  const float diff = grad - s.m;
  const float lerp_small = s.m + w1 * diff, lerp_large = grad - diff * (1.0f - w1);
  const float m = uniform_select(w1 < 0.5f, lerp_small, lerp_large);
  const float v = s.v * h[kBeta2] + (h[kOneMinusBeta2] * grad) * grad;
  const float denom = sqrtf(v) / h[kBias2Sqrt] + h[kEps];
  return {s.lam * h[kDecay] + (h[kNegStepSize] * m) / denom, m, v};  // decay: exact x1 for Adam
}

}  // namespace cbp
