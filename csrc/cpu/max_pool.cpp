// Max pooling 3x3 / stride 2 / padding 1 of float32 NCHW planes on the CPU (every ResNet
// stem's pool), values and int16 argmax bitwise ATen's (csrc/common/max_pool_api.h).
// ATen pools NCHW with a scalar loop per output (13 ms for SEW-ResNet-18's stem spikes
// [4, 64, 112, 112], one thread); its channels-last kernel is vectorized but needs the input
// transposed there and the output and argmax back (5.5 ms in all). Here 16 outputs of a row at
// once, reading the planes as they lie: per window row, two 32-value loads (columns 2j-1 ..
// 2j+30 and 2j+1 .. 2j+32) whose even / odd lanes are the window's left, middle and right
// columns (_mm512_permutex2var_ps), cells outside the plane read as -inf (never a maximum,
// and the first valid cell starts as the argmax, as ATen's loop). Without AVX-512 (cpu/isa.h)
// ATen's loop itself, one output at a time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/max_pool_api.h"
#include "cpu/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace cbp {
namespace {

// Output row i of one plane, ATen's loop (aten/src/ATen/native/cpu/MaxPoolKernel.cpp,
// cpu_max_pool): the window's cells inside the plane in row-major order, a cell taken when
// val > max or val is NaN, from max = -inf at the first cell.
void pool_row_scalar(const float* x, int64_t H, int64_t W, int64_t OW, int64_t i, float* y, int16_t* idx) {
  const int64_t h0 = std::max<int64_t>(2 * i - 1, 0), h1 = std::min<int64_t>(2 * i + 2, H);
  for (int64_t j = 0; j < OW; ++j) {
    const int64_t w0 = std::max<int64_t>(2 * j - 1, 0), w1 = std::min<int64_t>(2 * j + 2, W);
    int64_t best = h0 * W + w0;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const float v = x[h * W + w];
        if (v > m || std::isnan(v)) {
          m = v;
          best = h * W + w;
        }
      }
    }
    y[j] = m;
    idx[j] = static_cast<int16_t>(best);
  }
}

// Input row h of one plane of the backward: each cell gathers the gradients of the outputs
// whose argmax it is, in output order (rows i, then columns j, ascending), from 0: the order
// in which ATen's backward scatter-adds them. Cell h lies in the windows of rows h >> 1 and
// (h + 1) >> 1 (one row when h is even), columns alike.
void unpool_row_scalar(const float* g, const int16_t* idx, int64_t OH, int64_t OW, int64_t W, int64_t h, float* out) {
  const int64_t i0 = h >> 1, i1 = std::min<int64_t>((h + 1) >> 1, OH - 1);
  for (int64_t w = 0; w < W; ++w) {
    const int64_t j0 = w >> 1, j1 = std::min<int64_t>((w + 1) >> 1, OW - 1);
    const int64_t cell = h * W + w;
    float acc = 0.0f;
    for (int64_t i = i0; i <= i1; ++i) {
      for (int64_t j = j0; j <= j1; ++j) {
        if (idx[i * OW + j] == cell) acc += g[i * OW + j];
      }
    }
    out[w] = acc;
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define CBP_AVX512F __attribute__((target("avx512f")))

bool has_avx512f() { return avx512_allowed() && __builtin_cpu_supports("avx512f"); }

// 16 values of a row from column c on, -inf where the column is outside [0, W) (masked: the
// lanes outside are not read).
CBP_AVX512F inline __m512 load_row(const float* row, int64_t c, int64_t W) {
  const int64_t lo = std::max<int64_t>(0, -c), hi = std::min<int64_t>(16, W - c);
  const uint32_t in = hi > lo ? ((1u << hi) - 1u) & ~((1u << lo) - 1u) : 0u;
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                              static_cast<__mmask16>(in), row + c);
}

// ATen's update for 16 outputs at once: lanes where v > m or v is NaN take v and its index.
CBP_AVX512F inline void take(__m512 v, __m512i at, __m512& m, __m512i& best) {
  const __mmask16 up = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  m = _mm512_mask_mov_ps(m, up, v);
  best = _mm512_mask_mov_epi32(best, up, at);
}

CBP_AVX512F void pool_row_avx512(const float* x, int64_t H, int64_t W, int64_t OW, int64_t i, float* y,
                                 int16_t* idx) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t h0 = std::max<int64_t>(2 * i - 1, 0), h1 = std::min<int64_t>(2 * i + 2, H);
  for (int64_t j0 = 0; j0 < OW; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, OW - j0);
    const int64_t c = 2 * j0 - 1;  // the left column of output j0's window
    const __m512i left = _mm512_add_epi32(even, _mm512_set1_epi32(static_cast<int>(c)));  // 2j - 1 per lane
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512i zero = _mm512_setzero_si512();  // the first cell: column max(2j - 1, 0) of row h0
    __m512i best = _mm512_add_epi32(_mm512_mask_mov_epi32(left, _mm512_cmplt_epi32_mask(left, zero), zero),
                                    _mm512_set1_epi32(static_cast<int>(h0 * W)));
    for (int64_t h = h0; h < h1; ++h) {
      const float* row = x + h * W;
      const __m512 a0 = load_row(row, c, W), a1 = load_row(row, c + 16, W);        // columns 2j-1, 2j
      const __m512 b0 = load_row(row, c + 2, W), b1 = load_row(row, c + 18, W);    // columns 2j+1
      const __m512i at = _mm512_add_epi32(left, _mm512_set1_epi32(static_cast<int>(h * W)));
      take(_mm512_permutex2var_ps(a0, even, a1), at, m, best);
      take(_mm512_permutex2var_ps(a0, odd, a1), _mm512_add_epi32(at, _mm512_set1_epi32(1)), m, best);
      take(_mm512_permutex2var_ps(b0, even, b1), _mm512_add_epi32(at, _mm512_set1_epi32(2)), m, best);
    }
    const __mmask16 out = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_mask_storeu_ps(y + j0, out, m);
    _mm512_mask_cvtepi32_storeu_epi16(idx + j0, out, best);
  }
}

// The backward's input row h, 16 cells at once: the outputs of cells w0 .. w0+15 are columns
// w0/2 .. w0/2+8 of an output row; lane l's windows are columns w0/2 + (l >> 1) and, for odd
// l, the next one (permutexvar of the 16 gradients / argmaxes loaded from w0/2; the maskz forms
// with a full mask: gcc 12 warns on the plain ones' undefined source).
CBP_AVX512F void unpool_row_avx512(const float* g, const int16_t* idx, int64_t OH, int64_t OW, int64_t W, int64_t h,
                                   float* out) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i first = _mm512_srli_epi32(lane, 1);                            // l >> 1
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(1));        // (l >> 1) + 1
  const __mmask16 odd = 0xAAAA;
  const int64_t i0 = h >> 1, i1 = std::min<int64_t>((h + 1) >> 1, OH - 1);
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int64_t n = std::min<int64_t>(16, W - w0), j0 = w0 / 2, m = std::min<int64_t>(16, OW - j0);
    const __mmask16 cells = static_cast<__mmask16>((1u << n) - 1u);
    // the second window exists where its column is inside the output row
    const __mmask16 next = odd & _mm512_cmplt_epi32_mask(second, _mm512_set1_epi32(static_cast<int>(m)));
    const __m512i cell = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(h * W + w0)));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = i0; i <= i1; ++i) {
      const __mmask16 in = static_cast<__mmask16>((1u << m) - 1u);
      const __m512 gv = _mm512_maskz_loadu_ps(in, g + i * OW + j0);
      int16_t tail[16] = {0};  // int16 loads without AVX-512BW: the row's last columns copied
      const int16_t* src = idx + i * OW + j0;
      if (m < 16) {
        std::copy(src, src + m, tail);
        src = tail;
      }
      const __m512i iv = _mm512_maskz_cvtepi16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      const __mmask16 a = cells & _mm512_cmpeq_epi32_mask(_mm512_maskz_permutexvar_epi32(0xFFFF, first, iv), cell);
      acc = _mm512_mask_add_ps(acc, a, acc, _mm512_maskz_permutexvar_ps(0xFFFF, first, gv));
      const __mmask16 b = cells & next & _mm512_cmpeq_epi32_mask(_mm512_maskz_permutexvar_epi32(0xFFFF, second, iv), cell);
      acc = _mm512_mask_add_ps(acc, b, acc, _mm512_maskz_permutexvar_ps(0xFFFF, second, gv));
    }
    _mm512_mask_storeu_ps(out + w0, cells, acc);
  }
}
#endif

}  // namespace

namespace {

// row(vector, b, r) for every plane b < B and row r < R, in one OpenMP loop; vector: AVX-512
// allowed (cpu/isa.h) and present.
template <typename Row>
void for_each_row(int64_t B, int64_t R, const Row& row) {
  bool vector = false;
#if defined(__x86_64__) || defined(_M_X64)
  vector = has_avx512f();
#endif
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < R; ++r) row(vector, b, r);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_3x3s2_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "max_pool2d_3x3s2: x must be a contiguous float32 [B, H, W] tensor");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2);
  TORCH_CHECK(H >= 1 && W >= 1 && H * W <= (int64_t{1} << 15), "max_pool2d_3x3s2: needs 1 <= H * W <= 2^15");
  const int64_t OH = (H - 1) / 2 + 1, OW = (W - 1) / 2 + 1;
  auto y = at::empty({B, OH, OW}, x.options());
  auto idx = at::empty({B, OH, OW}, x.options().dtype(at::kShort));
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  int16_t* arg = idx.data_ptr<int16_t>();
  for_each_row(B, OH, [&](bool vector, int64_t b, int64_t i) {
    const float* plane = src + b * H * W;
    float* yr = dst + (b * OH + i) * OW;
    int16_t* ir = arg + (b * OH + i) * OW;
#if defined(__x86_64__) || defined(_M_X64)
    if (vector) return pool_row_avx512(plane, H, W, OW, i, yr, ir);
#endif
    pool_row_scalar(plane, H, W, OW, i, yr, ir);
  });
  return {y, idx};
}

at::Tensor max_pool2d_3x3s2_backward_cpu(const at::Tensor& grad_y, const at::Tensor& argmax, int64_t height,
                                          int64_t width) {
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.is_contiguous() && grad_y.scalar_type() == at::kFloat,
              "max_pool2d_3x3s2_backward: grad_y must be a contiguous float32 [B, OH, OW] tensor");
  TORCH_CHECK(argmax.sizes() == grad_y.sizes() && argmax.is_contiguous() && argmax.scalar_type() == at::kShort,
              "max_pool2d_3x3s2_backward: argmax must be a contiguous int16 tensor shaped as grad_y");
  TORCH_CHECK(height >= 1 && width >= 1 && height * width <= (int64_t{1} << 15) &&
                  grad_y.size(1) == (height - 1) / 2 + 1 && grad_y.size(2) == (width - 1) / 2 + 1,
              "max_pool2d_3x3s2_backward: height / width do not give grad_y's shape (or H * W > 2^15)");
  const int64_t B = grad_y.size(0), OH = grad_y.size(1), OW = grad_y.size(2);
  auto grad_x = at::empty({B, height, width}, grad_y.options());
  const float* g = grad_y.data_ptr<float>();
  const int16_t* idx = argmax.data_ptr<int16_t>();
  float* dst = grad_x.data_ptr<float>();
  for_each_row(B, height, [&](bool vector, int64_t b, int64_t h) {
    const float* gp = g + b * OH * OW;
    const int16_t* ip = idx + b * OH * OW;
    float* row = dst + (b * height + h) * width;
#if defined(__x86_64__) || defined(_M_X64)
    if (vector) return unpool_row_avx512(gp, ip, OH, OW, width, h, row);
#endif
    unpool_row_scalar(gp, ip, OH, OW, width, h, row);
  });
  return grad_x;
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, MaxPool2d3x3s2Op, max_pool2d_3x3s2_cpu);
  CBP_IMPL(m, MaxPool2d3x3s2BackwardOp, max_pool2d_3x3s2_backward_cpu);
}

}  // namespace cbp
