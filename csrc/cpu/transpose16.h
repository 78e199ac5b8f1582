// The one 16 x 16 float32 register transpose of the CPU kernels (AVX-512F): v[j][i] <- v[i][j].
// Used by conv_input_grad.cpp (grad_y NCHW -> pixel rows of channels) and plane_sum.cpp (the
// popcount conv's NHWC counts -> NCHW). Callers compiled for a superset of avx512f inline it.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace cbp {

// Unpack pairs of rows, then pairs of pairs (as doubles), then 128-bit lanes in two shuffles.
__attribute__((target("avx512f"))) inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  __m512 s[16];  // s[4q + c], 128-bit lane l: column 4l + c of rows 4q .. 4q + 3
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
    s[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    s[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    s[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    s[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 u = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x88), w = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x88), w2 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xDD);
    v[c] = _mm512_shuffle_f32x4(u, u2, 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(u, u2, 0xDD);
    v[4 + c] = _mm512_shuffle_f32x4(w, w2, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(w, w2, 0xDD);
  }
}

}  // namespace cbp
#endif
