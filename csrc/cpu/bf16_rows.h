// float32 -> bfloat16 rows with AVX512-BF16, bit for bit c10::BFloat16(float): the one home
// of that conversion for the CPU kernels' output rows.
//
// c10 rounds to nearest even with integer arithmetic, (u + 0x7FFF + ((u >> 16) & 1)) >> 16,
// and writes every NaN as 0x7FC0: GCC vectorizes it, but as ~7 instructions per 16 values
// (shift, and, two adds, NaN compare, blend, pack). vcvtne2ps2bf16 converts 32 values in one
// instruction, rounding to nearest even too, but it reads denormal inputs as zero and keeps a
// NaN's sign and payload; so a group of 32 holding a denormal or a NaN (vfpclassps, one
// instruction) takes c10's own conversion instead. A normal float never rounds to a denormal
// bfloat16 (same exponent range), so no other value differs.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#include "cpu/isa.h"

namespace cbp {

// True when the CPU has AVX512-BF16 (and F, BW, DQ) and cpu/isa.h allows it.
inline bool use_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  return has && avx512_bf16_allowed();
}

// dst[i] = c10::BFloat16(src[i]) for i < len, with non-temporal 64-byte stores when `stream`
// (dst 64-byte aligned; the caller fences). Only for CPUs where use_avx512_bf16() holds; not
// inlined (a call per row of a chunk, which the kernels' loops do not notice).
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16"), noinline)) inline void store_bf16_row_avx512(
    c10::BFloat16* dst, const float* src, int64_t len, bool stream) {
  constexpr int kSpecial = 0x01 | 0x80 | 0x20;  // vfpclassps: quiet NaN, signalling NaN, denormal
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i);
    const __m512 hi = _mm512_loadu_ps(src + i + 16);
    __m512i out = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [lo, hi] in order
    if ((_mm512_fpclass_ps_mask(lo, kSpecial) | _mm512_fpclass_ps_mask(hi, kSpecial)) != 0) {
      alignas(64) c10::BFloat16 exact[32];
      for (int j = 0; j < 32; ++j) exact[j] = static_cast<c10::BFloat16>(src[i + j]);
      out = _mm512_load_si512(exact);
    }
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), out);
    } else {
      _mm512_storeu_si512(dst + i, out);
    }
  }
  const int tail = static_cast<int>(len - i);  // < 32
  for (int j = 0; j < tail; ++j) dst[i + j] = static_cast<c10::BFloat16>(src[i + j]);
}

}  // namespace cbp
