// The one e^x of the kernels (the neuron's Sigmoid surrogate, the sigmoid-sum quantizer):
// plain C++ for the host compiler, nvcc and NVRTC alike.
#pragma once

#include "common/hd.h"

namespace cbp {

// e^x in float32, the same result on every compiler, host and device: only IEEE additions and
// multiplications, each rounded once (no FMA: -ffp-contract=off / --fmad=false), so the CPU and
// CUDA kernels agree bit for bit (libm's and CUDA's expf differ by up to 2 ulp, and CUDA's is
// built from fma and ex2.approx). On the CPU libm's expf is also a call that keeps a loop scalar
// (the neuron backward's Sigmoid surrogate was 6x slower than ATan's); this vectorizes:
// x = n ln2 + r (Cody-Waite, ln2 in two parts), e^r by its degree-6 Taylor polynomial
// (|r| <= ln2/2), 2^n written into the exponent bits (n read from the bits of
// x log2(e) + 1.5 * 2^23, no float-to-int conversion). Within 3 ulp of expf on [-87, 88]; x is
// clamped to that range (where a sigmoid is 0 or 1 to float precision either way); NaN stays NaN.
CBP_HD float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int ni = __builtin_bit_cast(int, t) - __builtin_bit_cast(int, shifter);
  return p * __builtin_bit_cast(float, (ni + 127) << 23);
}

}  // namespace cbp
