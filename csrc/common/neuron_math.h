// Scalar math of the multi-step spiking neuron, shared by the CPU (C++) and CUDA kernels.
// Plain C++ with no torch or CUDA runtime includes, so NVRTC (the CuPy backend) compiles it
// too. All arithmetic is float32: the membrane state accumulates in float32 whatever the
// storage dtype. Equations follow SpikingJelly 2.0 (BaseNode / LIFNode / IFNode / PLIF):
//   charge  LIF, decay_input:   H[t] = V[t-1] + (V_reset - V[t-1] + X[t]) * k     (k = 1/tau)
//           LIF, !decay_input:  H[t] = V[t-1] + (V_reset - V[t-1]) * k + X[t]
//           IF:                 H[t] = V[t-1] + X[t]
//   fire    S[t] = (H[t] - V_th >= 0)
//   reset   hard: V[t] = H[t] * (1 - S[t]) + V_reset * S[t];  soft: V[t] = H[t] - V_th * S[t]
// Soft reset uses V_reset = 0 in the charge equation (SpikingJelly's v_reset=None).
#pragma once

#include "common/exp_math.h"
#include "common/hd.h"

namespace cbp {

enum NeuronKind : int { kIF = 0, kLIF = 1 };  // PLIF is LIF whose k gets a gradient
enum Surrogate : int { kATan = 0, kSigmoid = 1, kRectangle = 2, kTriangle = 3, kPiecewiseQuadratic = 4 };

struct NeuronParams {
  float v_threshold;
  float v_reset;      // 0 when soft_reset
  int kind;           // NeuronKind
  bool soft_reset;
  bool decay_input;
  bool detach_reset;
  int surrogate;      // Surrogate
  float alpha;
};

// NeuronParams from kernel arguments (ints for the flags, as CuPy passes them).
CBP_HD NeuronParams neuron_params(float v_threshold, float v_reset, int kind, int soft_reset, int decay_input,
                                  int detach_reset, int surrogate, float alpha) {
  return NeuronParams{v_threshold, v_reset, kind, soft_reset != 0, decay_input != 0, detach_reset != 0,
                      surrogate, alpha};
}

CBP_HD float neuron_charge(float v, float x, float k, const NeuronParams& p) {
  if (p.kind == kIF) return v + x;
  return p.decay_input ? v + (p.v_reset - v + x) * k : v + (p.v_reset - v) * k + x;
}

// dH/dV[t-1], dH/dX[t] and dH/dk of the charge equation.
CBP_HD float charge_dh_dv(float k, const NeuronParams& p) { return p.kind == kIF ? 1.0f : 1.0f - k; }
CBP_HD float charge_dh_dx(float k, const NeuronParams& p) {
  return (p.kind == kLIF && p.decay_input) ? k : 1.0f;
}
CBP_HD float charge_dh_dk(float v_prev, float x, const NeuronParams& p) {
  return p.decay_input ? p.v_reset - v_prev + x : p.v_reset - v_prev;
}

CBP_HD float neuron_reset(float h, float s, const NeuronParams& p) {
  return p.soft_reset ? h - p.v_threshold * s : h * (1.0f - s) + p.v_reset * s;
}

// One forward step on V in place: H = charge(V, X); S = (H - V_th >= 0); V = reset(H, S).
// Returns S (the fused kernels that keep no H: packed_conv2d_lif).
CBP_HD bool neuron_step(float& v, float x, float k, const NeuronParams& p) {
  const float h = neuron_charge(v, x, k, p);
  const bool s = h - p.v_threshold >= 0.0f;
  v = neuron_reset(h, s ? 1.0f : 0.0f, p);
  return s;
}

// Surrogate derivative sg'(x) at x = H - V_th (SpikingJelly's formulas, same alpha).
CBP_HD float surrogate_grad(float x, int surrogate, float alpha) {
  switch (surrogate) {
    case kATan: {  // alpha/2 / (1 + (pi/2 * alpha * x)^2)
      const float z = 1.57079632679489662f * alpha * x;
      return alpha * 0.5f / (1.0f + z * z);
    }
    case kSigmoid: {  // alpha * sig(alpha x) * (1 - sig(alpha x))
      const float s = 1.0f / (1.0f + exp_f32(-alpha * x));
      return alpha * s * (1.0f - s);
    }
    case kRectangle:  // alpha * 1{|x| < 0.5/alpha}
      return fabsf(x) < 0.5f / alpha ? alpha : 0.0f;
    case kTriangle: {  // alpha * max(0, 1 - |x|)  (a select, not fmaxf: GCC vectorizes it)
      const float y = 1.0f - fabsf(x);
      return alpha * (y > 0.0f ? y : 0.0f);
    }
    default: {  // kPiecewiseQuadratic: max(0, alpha - alpha^2 |x|)
      const float y = alpha - alpha * alpha * fabsf(x);
      return y > 0.0f ? y : 0.0f;
    }
  }
}

// dV[t]/dH[t] through the reset, with sg = dS/dH (0 when the reset is detached).
CBP_HD float reset_dv_dh(float h, float s, float sg, const NeuronParams& p) {
  if (p.detach_reset) return p.soft_reset ? 1.0f : 1.0f - s;
  return p.soft_reset ? 1.0f - p.v_threshold * sg : 1.0f - s + (p.v_reset - h) * sg;
}

}  // namespace cbp
