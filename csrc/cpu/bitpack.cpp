// Bit packing of {0,1} tensors on the CPU: rows of C values to ceil(C/32) 32-bit words
// (stored as int32), least significant bit first, zero padded, and back.
//   pack    word[r, w] = sum_{b<32, 32w+b<C} (x[r, 32w+b] != 0) << b
//   unpack  y[r, c]    = (word[r, c/32] >> (c % 32)) & 1
// The pack also counts the values other than 0 and 1 in the same pass; the caller
// (cbp_kernels/ops/bitpack/op.py) raises when the count is not 0. float32 input with
// contiguous channels (NHWC) or contiguous pixels (NCHW) takes AVX-512 paths, and so do the
// unpacks to float32 and to uint8 / bool (AVX-512BW) (run-time check; the generic loops where
// cpu/isa.h disallows AVX-512, e.g. CBP_KERNELS_NO_AVX512=1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "common/bitpack_api.h"
#include "cpu/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace cbp {
namespace {

// The pack loops run over (row, block of kWordBlock words): the training step packs each saved
// spike tensor as ONE row (lifconv's _compact_known), which a loop over rows ran on one thread;
// blocks of 256 words (8192 values) keep the per-word loop as it was. The 9 spike packs of
// SEW-ResNet-18's CBP step, A/B in one process, interleaved, min of 21, under load, rows in
// parallel -> row blocks: two threads 1.77 -> 1.00 ms at batch 1, 19.4 -> 10.5 ms at batch 8;
// one thread 1.84 -> 1.90 and 19.2 -> 19.6 ms.
constexpr int64_t kWordBlock = 256;

// Generic path: any dtype, any strides. Returns the number of values other than 0 and 1.
template <typename scalar_t>
int64_t pack_generic(const scalar_t* x, uint32_t* out, int64_t B, int64_t R, int64_t C, int64_t sb, int64_t sr,
                     int64_t sc, int64_t words) {
  int64_t bad = 0;
  const int64_t blocks = (words + kWordBlock - 1) / kWordBlock;
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : bad)
  for (int64_t br = 0; br < B * R; ++br) {
    for (int64_t wb = 0; wb < blocks; ++wb) {
      const int64_t b = br / R, r = br % R;
      const scalar_t* row = x + b * sb + r * sr;
      for (int64_t w = wb * kWordBlock; w < std::min(words, wb * kWordBlock + kWordBlock); ++w) {
        const int64_t begin = w * 32, end = std::min<int64_t>(C, begin + 32);
        uint32_t bits = 0;
        for (int64_t c = begin; c < end; ++c) {
          const scalar_t v = row[c * sc];
          bits |= static_cast<uint32_t>(v != scalar_t(0)) << (c - begin);
          bad += (v != scalar_t(0)) && (v != scalar_t(1));
        }
        out[(b * R + r) * words + w] = bits;
      }
    }
  }
  return bad;
}

#if defined(__x86_64__) || defined(_M_X64)
#define CBP_AVX512F __attribute__((target("avx512f")))

bool has_avx512f() { return avx512_allowed() && __builtin_cpu_supports("avx512f"); }

// float32, channels contiguous (sc == 1, e.g. NHWC): 16 channels -> one 16-bit compare mask,
// two masks -> one word.
CBP_AVX512F int64_t pack_f32_rows(const float* x, uint32_t* out, int64_t B, int64_t R, int64_t C, int64_t sb,
                                  int64_t sr, int64_t words) {
  int64_t bad = 0;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const int64_t blocks = (words + kWordBlock - 1) / kWordBlock;
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : bad)
  for (int64_t br = 0; br < B * R; ++br) {
    for (int64_t wb = 0; wb < blocks; ++wb) {
      const int64_t b = br / R, r = br % R;
      const float* row = x + b * sb + r * sr;
      uint32_t* dst = out + br * words;
      for (int64_t w = wb * kWordBlock; w < std::min(words, wb * kWordBlock + kWordBlock); ++w) {
        uint32_t bits = 0;
        for (int half = 0; half < 2; ++half) {
          const int64_t c0 = w * 32 + half * 16;
          if (c0 >= C) break;
          const int64_t n = std::min<int64_t>(16, C - c0);
          const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
          const __m512 v = _mm512_maskz_loadu_ps(m, row + c0);
          const __mmask16 nz = _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NEQ_UQ);
          bad += __builtin_popcount(_mm512_mask_cmp_ps_mask(nz, v, one, _CMP_NEQ_UQ));
          bits |= static_cast<uint32_t>(nz) << (half * 16);
        }
        dst[w] = bits;
      }
    }
  }
  return bad;
}

// float32, rows contiguous (sr == 1, e.g. NCHW packed along C): 16 pixels at a time, one
// vector load per channel, the compare mask ORed into bit c of the 16 pixels' words.
CBP_AVX512F int64_t pack_f32_pixels(const float* x, uint32_t* out, int64_t B, int64_t R, int64_t C, int64_t sb,
                                    int64_t sc, int64_t words) {
  int64_t bad = 0;
  const int64_t blocks = (R + 15) / 16;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : bad)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * 16, n = std::min<int64_t>(16, R - r0);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      // word index (r0 + p) * words + w of pixel p: scattered with a stride of `words`
      const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(words)));
      uint32_t* dst = out + (b * R + r0) * words;
      for (int64_t w = 0; w < words; ++w) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = w * 32; c < std::min<int64_t>(C, w * 32 + 32); ++c) {
          const __m512 v = _mm512_maskz_loadu_ps(m, x + b * sb + c * sc + r0);
          const __mmask16 nz = _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NEQ_UQ);
          bad += __builtin_popcount(_mm512_mask_cmp_ps_mask(nz, v, one, _CMP_NEQ_UQ));
          acc = _mm512_mask_or_epi32(acc, nz, acc, _mm512_set1_epi32(static_cast<int>(1u << (c - w * 32))));
        }
        _mm512_mask_i32scatter_epi32(dst + w, m, idx, acc, 4);
      }
    }
  }
  return bad;
}

bool has_avx512bw() { return has_avx512f() && __builtin_cpu_supports("avx512bw"); }
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> bitpack_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "bitpack: x must be a [B, R, C] tensor");
  const int64_t B = x.size(0), R = x.size(1), C = x.size(2), words = (C + 31) / 32;
  auto out = at::empty({B, R, words}, x.options().dtype(at::kInt));
  int64_t bad = 0;
  if (out.numel() > 0) {
    auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
    const int64_t sb = x.stride(0), sr = x.stride(1), sc = x.stride(2);
    bool done = false;
#if defined(__x86_64__) || defined(_M_X64)
    if (x.scalar_type() == at::kFloat && has_avx512f() && (sc == 1 || sr == 1)) {
      bad = sc == 1 ? pack_f32_rows(x.data_ptr<float>(), dst, B, R, C, sb, sr, words)
                    : pack_f32_pixels(x.data_ptr<float>(), dst, B, R, C, sb, sc, words);
      done = true;
    }
#endif
    if (!done) {
      AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, x.scalar_type(), "bitpack", [&] {
        bad = pack_generic<scalar_t>(x.data_ptr<scalar_t>(), dst, B, R, C, sb, sr, sc, words);
      });
    }
  }
  return {out, at::scalar_tensor(bad, x.options().dtype(at::kLong))};
}

namespace {

template <typename scalar_t>
void unpack_rows(const uint32_t* words, scalar_t* y, int64_t rows, int64_t C, int64_t nwords) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      y[r * C + c] = static_cast<scalar_t>((words[r * nwords + c / 32] >> (c % 32)) & 1u);
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// float32: 16 values per 16-bit half word, one masked move of 1.0f each (the scalar loop
// above converts bit by bit: 0.88 ms for SEW-ResNet-18's [4, 64, 56, 56] spikes, one thread,
// against 0.19 ms to fill the same output; a training step restores nine such tensors).
CBP_AVX512F void unpack_f32_rows(const uint32_t* words, float* y, int64_t rows, int64_t C, int64_t nwords) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const int64_t blocks = (C + 15) / 16;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * 16, n = std::min<int64_t>(16, C - c0);
      const __mmask16 bits = static_cast<__mmask16>(words[r * nwords + c0 / 32] >> (c0 % 32));
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      _mm512_mask_storeu_ps(y + r * C + c0, m, _mm512_maskz_mov_ps(bits, one));
    }
  }
}

// 1-byte 0 / 1 (uint8, bool): 64 values per two words, one masked byte move of 1 each; the
// blocks of all rows in one parallel loop (the training step unpacks each saved spike tensor
// as ONE row of uint8 for ops.conv_weight_grad, which the scalar loop above ran on one thread,
// bit by bit). The 9 unpacks of SEW-ResNet-18's batch-1 CBP step, A/B in one process, min of
// 21, under load: 4.55 -> 0.59 ms on one thread, 4.51 -> 0.40 ms on two.
__attribute__((target("avx512f,avx512bw"))) void unpack_u8_rows(const uint32_t* words, uint8_t* y, int64_t rows,
                                                                 int64_t C, int64_t nwords) {
  const __m512i one = _mm512_set1_epi8(1);
  const int64_t blocks = (C + 63) / 64;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * 64, n = std::min<int64_t>(64, C - c0), w = r * nwords + c0 / 32;
      const uint64_t high = c0 / 32 + 1 < nwords ? words[w + 1] : 0u;
      const __mmask64 bits = static_cast<__mmask64>(words[w] | high << 32);
      const __mmask64 m = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
      _mm512_mask_storeu_epi8(y + r * C + c0, m, _mm512_maskz_mov_epi8(bits, one));
    }
  }
}
#endif

}  // namespace

at::Tensor bitunpack_cpu(const at::Tensor& words, int64_t size, at::ScalarType dtype) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "bitunpack: words must be a contiguous int32 [R, W] tensor");
  TORCH_CHECK(size <= words.size(1) * 32, "bitunpack: size exceeds the packed bits");
  const int64_t rows = words.size(0);
  auto out = at::empty({rows, size}, words.options().dtype(dtype));
#if defined(__x86_64__) || defined(_M_X64)
  if (dtype == at::kFloat && has_avx512f()) {
    unpack_f32_rows(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), out.data_ptr<float>(), rows, size,
                    words.size(1));
    return out;
  }
  if ((dtype == at::kByte || dtype == at::kBool) && has_avx512bw()) {
    unpack_u8_rows(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()),
                   static_cast<uint8_t*>(out.data_ptr()), rows, size, words.size(1));
    return out;
  }
#endif
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, dtype, "bitunpack", [&] {
    unpack_rows<scalar_t>(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), out.data_ptr<scalar_t>(),
                          rows, size, words.size(1));
  });
  return out;
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, BitpackOp, bitpack_cpu);
  CBP_IMPL(m, BitunpackOp, bitunpack_cpu);
}

}  // namespace cbp
