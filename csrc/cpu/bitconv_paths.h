// Internal to the CPU popcount convolution, between its three files: bitconv.cpp (the
// equation, the portable path, the choice of path and the ops), bitconv_avx512.cpp and
// bitconv_amx.cpp. It holds the run-time checks, the constants the AVX-512 and AMX paths
// share, the 16-lane LIF step of their fused epilogues, and each path's entry points.
#pragma once

// GCC 12 warns about its own AVX-512 intrinsics (_mm512_setzero_*: "__Y may be used uninitialized").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <omp.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define CBP_HAVE_X86 1
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/bitconv_host.h"
#include "common/neuron_math.h"
#include "cpu/isa.h"


namespace cbp {
namespace bitconv_cpu {


constexpr int kLanes = 16;    // 32-bit lanes per 512-bit register
constexpr int kMaxJ = 4;      // 16-channel blocks per register block
// Pixel blocks per OpenMP work item: 8 x 6 pixels reuse a chunk's weights (<= 37 KiB for
// 512 channels 3x3, in L1) and still give 2 cores hundreds of items on SEW-ResNet layer4.
constexpr int64_t kSuper = 8;

inline bool use_avx512() {
#ifdef CBP_HAVE_X86
  return avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

#ifdef CBP_HAVE_X86
#define CBP_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

// The neuron's step on 16 lanes with the arithmetic of csrc/common/neuron_math.h in the
// same order (bit for bit):
//   y = c * mul + add;  H = charge(V, y);  S = (H - V_th >= 0);  V = reset(H, S).
// Returns the lanes of m that fire; v holds the new membrane.
__attribute__((target("avx512f"), always_inline)) inline __mmask16 lif_step16(__m512 c, __m512 mul, __m512 add,
                                                                              __m512& v, __mmask16 m, float k,
                                                                              const NeuronParams& np) {
  const __m512 kk = _mm512_set1_ps(k), vr = _mm512_set1_ps(np.v_reset), vth = _mm512_set1_ps(np.v_threshold);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 y = _mm512_add_ps(_mm512_mul_ps(c, mul), add);
  __m512 h;
  if (np.kind == kIF) {
    h = _mm512_add_ps(v, y);
  } else if (np.decay_input) {
    h = _mm512_add_ps(v, _mm512_mul_ps(_mm512_add_ps(_mm512_sub_ps(vr, v), y), kk));
  } else {
    h = _mm512_add_ps(_mm512_add_ps(v, _mm512_mul_ps(_mm512_sub_ps(vr, v), kk)), y);
  }
  const __mmask16 fire = _mm512_mask_cmp_ps_mask(m, _mm512_sub_ps(h, vth), _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 s = _mm512_maskz_mov_ps(fire, one);
  v = np.soft_reset ? _mm512_sub_ps(h, _mm512_mul_ps(vth, s))
                    : _mm512_add_ps(_mm512_mul_ps(h, _mm512_sub_ps(one, s)), _mm512_mul_ps(vr, s));
  return fire;
}

// One pixel's step of the fused epilogue on `width` (<= 64) channels, 16 lanes at a time;
// the spike bits go to dst[0 .. ceil(width/32)).
CBP_AVX512 inline void lif_tile(const float* c, const float* mul, const float* add, float* v, int64_t width, float k,
                         const NeuronParams& np, uint32_t* dst) {
  uint32_t words[kMaxJ * kLanes / 32] = {};
  for (int64_t l0 = 0; l0 < width; l0 += kLanes) {
    const __mmask16 m = static_cast<__mmask16>(width - l0 >= kLanes ? 0xFFFFu : (1u << (width - l0)) - 1u);
    __m512 vo = _mm512_maskz_loadu_ps(m, v + l0);
    const __mmask16 fire = lif_step16(_mm512_maskz_loadu_ps(m, c + l0), _mm512_maskz_loadu_ps(m, mul + l0),
                                      _mm512_maskz_loadu_ps(m, add + l0), vo, m, k, np);
    _mm512_mask_storeu_ps(v + l0, m, vo);
    words[l0 / 32] |= static_cast<uint32_t>(fire) << (l0 % 32);
  }
  for (int64_t w = 0; w < (width + 31) / 32; ++w) dst[w] = words[w];
}

// The AVX-512 VPOPCNTDQ path (bitconv_avx512.cpp): the convolution, and with the fused epilogue.
void bitconv_avx512(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                    const BitConvGeometry& g);
void bitconv_lif_avx512(const uint32_t* x, const uint32_t* planes, const float* mul, const float* add,
                        const BitConvGeometry& g, int64_t T, float k, const NeuronParams& np, uint32_t* spikes,
                        float* v_last);

// The AMX-INT8 path (bitconv_amx.cpp): whether it runs for this layer, and its two entry points.
bool use_amx(const BitConvGeometry& g);
void bitconv_amx(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                 const BitConvGeometry& g);
void bitconv_lif_amx(const uint32_t* x, const uint32_t* planes, const float* mul, const float* add,
                     const BitConvGeometry& g, int64_t T, float k, const NeuronParams& np, uint32_t* spikes,
                     float* v_last);
#endif  // CBP_HAVE_X86

}  // namespace bitconv_cpu
}  // namespace cbp
