// The integer forward's epilogue on the CPU (csrc/common/plane_sum_api.h): the popcount conv's
// bit-plane counts, NHWC, summed with their powers of two, times the scale, stored NCHW:
//   out[n, o, p] = float32(sum_{b < P} 2^b * counts[b * N + n, p, o]) * s     (p = h * OW + w)
// in one pass. The torch code (a strided mul writing NCHW from the permuted NHWC sum) runs
// ATen's strided TensorIterator at ~1/3 of copy speed (8.3 ms vs 2.6-3.7 ms for a clone of
// [32, 56, 56, 64], one thread). Here per (image, block of 2^16 / O pixels), per 16 channels,
// 16 x 16 tiles: 16 pixel rows of 16 channels loaded (each plane's, summed: exact integers),
// scaled, transposed in registers (cpu/transpose16.h) and stored as 16 channel rows of 16
// pixels; tails masked. Without AVX-512 (cpu/isa.h) the same tiles through a buffer in memory.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/plane_sum_api.h"
#include "cpu/isa.h"
#include "cpu/transpose16.h"

namespace cbp {
namespace {

// Counts per plane of one work item: 2^16 (256 KB of float32, in L2 while its 16-channel
// columns are read one after another); its pixels, a multiple of 16, are the run written to each
// channel row. Chosen by A/B, one thread, min of 11, under load (2026-12-07): [32, 56, 56, 64]
// 3.09 ms at 1024 pixels (2^16 counts) vs 4.13 at 64, 3.37 at 256, 3.35 at 4096 (clone 2.72);
// [32, 28, 28, 128] 1.20-1.37 ms from 64 to 4096 pixels, the smaller maps within 0.02 ms.
constexpr int64_t kCountsPerBlock = int64_t{1} << 16;

struct Dims {
  int64_t P, N, HW, O;
  float s;
};

// Pixels [p0, p1) of image n, every channel: out[n, o, p] = float32(sum_b 2^b c_b) * s, through
// 16 x 16 tiles in memory (rows read along the channels, columns written along the pixels).
void block_scalar(const float* counts, const Dims& d, int64_t n, int64_t p0, int64_t p1, float* out) {
  const int64_t plane = d.N * d.HW * d.O;
  for (int64_t o0 = 0; o0 < d.O; o0 += 16) {
    const int64_t no = std::min<int64_t>(16, d.O - o0);
    for (int64_t q = p0; q < p1; q += 16) {
      const int64_t np = std::min<int64_t>(16, p1 - q);
      float t[16][16];  // t[i][j]: channel o0 + j of pixel q + i (rows summed and scaled as read)
      for (int64_t i = 0; i < np; ++i) {
        const float* src = counts + (n * d.HW + q + i) * d.O + o0;
        float* row = t[i];
        std::copy(src, src + no, row);
        for (int64_t b = 1; b < d.P; ++b) {
          const float w = static_cast<float>(int64_t{1} << b);
          for (int64_t j = 0; j < no; ++j) row[j] += w * src[b * plane + j];  // exact
        }
        for (int64_t j = 0; j < no; ++j) row[j] *= d.s;  // rounded once
      }
      float* dst = out + (n * d.O + o0) * d.HW + q;
      for (int64_t j = 0; j < no; ++j) {
        for (int64_t i = 0; i < np; ++i) dst[j * d.HW + i] = t[i][j];
      }
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define CBP_AVX512F __attribute__((target("avx512f")))

bool has_avx512f() { return avx512_allowed() && __builtin_cpu_supports("avx512f"); }

inline __mmask16 first(int64_t k) { return static_cast<__mmask16>(k >= 16 ? 0xFFFFu : (1u << k) - 1u); }

// The same, 16 x 16 tiles: rows i of pixels p0 + i (16 channels each, every plane summed, then
// scaled) transposed into rows j of channels o0 + j, stored 16 pixels at a time.
CBP_AVX512F void block_avx512(const float* counts, const Dims& d, int64_t n, int64_t p0, int64_t p1, float* out) {
  const int64_t plane = d.N * d.HW * d.O;
  const __m512 s = _mm512_set1_ps(d.s);
  for (int64_t o0 = 0; o0 < d.O; o0 += 16) {
    const int64_t no = std::min<int64_t>(16, d.O - o0);
    const __mmask16 channels = first(no);
    for (int64_t q = p0; q < p1; q += 16) {
      const int64_t np = std::min<int64_t>(16, p1 - q);
      const float* src = counts + (n * d.HW + q) * d.O + o0;
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= np) {
          v[i] = _mm512_setzero_ps();
          continue;
        }
        __m512 c = _mm512_maskz_loadu_ps(channels, src + i * d.O);
        for (int64_t b = 1; b < d.P; ++b)  // c + 2^b * c_b: integers below 2^24, exact
          c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(channels, src + b * plane + i * d.O),
                              _mm512_set1_ps(static_cast<float>(int64_t{1} << b)), c);
        v[i] = _mm512_mul_ps(c, s);  // rounded once
      }
      transpose16(v);  // v[j]: channel o0 + j of pixels q .. q + 15
      float* dst = out + (n * d.O + o0) * d.HW + q;
      const __mmask16 pixels = first(np);
      for (int64_t j = 0; j < no; ++j) _mm512_mask_storeu_ps(dst + j * d.HW, pixels, v[j]);
    }
  }
}
#endif

}  // namespace

at::Tensor plane_sum_nchw_cpu(const at::Tensor& counts, int64_t planes, const at::Tensor& scale) {
  TORCH_CHECK(counts.dim() == 4 && counts.is_contiguous() && counts.scalar_type() == at::kFloat,
              "plane_sum_nchw: counts must be a contiguous float32 [P * N, OH, OW, O] tensor");
  TORCH_CHECK(planes >= 1 && planes <= 8 && counts.size(0) % planes == 0,
              "plane_sum_nchw: planes must be in 1..8 and divide counts.size(0)");
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device().is_cpu(),
              "plane_sum_nchw: scale must be a one-element float32 CPU tensor");
  const int64_t N = counts.size(0) / planes, OH = counts.size(1), OW = counts.size(2), O = counts.size(3);
  auto out = at::empty({N, O, OH, OW}, counts.options());
  const Dims d{planes, N, OH * OW, O, scale.item<float>()};
  const float* src = counts.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  bool vector = false;
#if defined(__x86_64__) || defined(_M_X64)
  vector = has_avx512f();
#endif
  const int64_t pixels = std::max<int64_t>(16, kCountsPerBlock / O / 16 * 16);
  const int64_t blocks = (d.HW + pixels - 1) / pixels;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t p0 = k * pixels, p1 = std::min(d.HW, p0 + pixels);
#if defined(__x86_64__) || defined(_M_X64)
      if (vector) {
        block_avx512(src, d, n, p0, p1, dst);
        continue;
      }
#endif
      block_scalar(src, d, n, p0, p1, dst);
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) { CBP_IMPL(m, PlaneSumNchwOp, plane_sum_nchw_cpu); }

}  // namespace cbp
