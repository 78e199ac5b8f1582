// Bit-packed popcount convolution on the CPU (binary and ternary weights on {0,1} spikes).
// Equation (csrc/common/bitconv_math.h): per output (n, oh, ow, o), an integer count over
// the in-bounds taps and the channel words of the group,
//   binary c = sum 2*popc(x & w) - popc(x),  ternary c = sum popc(x & p) - popc(x & n),
// then out = float(c) * scale + bias[o] (float32, two roundings), output NHWC float32.
//
// Two paths, chosen at run time:
// - AVX-512 VPOPCNTDQ (when the CPU has it and CBP_KERNELS_NO_AVX512 is not set to 1):
//   vectorised over 16 output channels per 512-bit register. The weights are re-laid out
//   per call to [P][G][O-block of 16][K][16] (K = KH*KW*Wg words), so one K step loads one
//   register per 16 output channels and broadcasts one input word per pixel. A register
//   block of kPix output pixels x J (<= 4) blocks of 16 output channels keeps kPix*J
//   accumulators (16 for binary, + 2J weight registers for ternary, inside the 32 zmm).
//   OpenMP runs over (n, output row, group, chunk of 4*16 output channels).
// - portable: the same counts with __builtin_popcount, one output at a time.
// GCC 12 warns about its own AVX-512 intrinsics (_mm512_setzero_*: "__Y may be used uninitialized").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CBP_HAVE_X86 1
#endif

#include "common/bitconv_math.h"

namespace cbp {
namespace {

constexpr int kLanes = 16;    // 32-bit lanes per 512-bit register
constexpr int kMaxJ = 4;      // 16-channel blocks per register block
// Pixel blocks per OpenMP work item: 8 x 6 pixels reuse a chunk's weights (<= 37 KiB for
// 512 channels 3x3, in L1) and still give 2 cores hundreds of items on SEW-ResNet layer4.
constexpr int64_t kSuper = 8;

bool use_avx512() {
#ifdef CBP_HAVE_X86
  const char* off = std::getenv("CBP_KERNELS_NO_AVX512");
  if (off != nullptr && std::strcmp(off, "1") == 0) return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

// ---------------------------------------------------------------- portable path
void bitconv_portable(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                      const BitConvGeometry& g) {
  const int64_t Wg = g.words_per_group, Og = g.out_per_group, O = g.groups * Og, Cw = g.groups * Wg;
  const int64_t K = g.KH * g.KW * Wg;
  const bool ternary = g.planes == 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        float* dst = out + ((n * g.OH + oh) * g.OW + ow) * O;
        for (int64_t o = 0; o < O; ++o) {
          const int64_t grp = o / Og;
          const uint32_t* wp = planes + o * K;
          const uint32_t* wn = planes + (O + o) * K;  // ternary only
          int32_t c = 0;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
              if (iw < 0 || iw >= g.W) continue;
              const uint32_t* xp = x + ((n * g.H + ih) * g.W + iw) * Cw + grp * Wg;
              const int64_t k0 = (kh * g.KW + kw) * Wg;
              for (int64_t w = 0; w < Wg; ++w) {
                if (ternary) {
                  c += __builtin_popcount(xp[w] & wp[k0 + w]) - __builtin_popcount(xp[w] & wn[k0 + w]);
                } else {
                  c += 2 * __builtin_popcount(xp[w] & wp[k0 + w]) - __builtin_popcount(xp[w]);
                }
              }
            }
          }
          dst[o] = bitconv_epilogue(c, scale, bias ? bias[o] : 0.0f);
        }
      }
    }
  }
}

#ifdef CBP_HAVE_X86
// ---------------------------------------------------------------- AVX-512 VPOPCNTDQ path
#define CBP_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

// Where a register block reads its input: interior blocks (every tap of every pixel inside
// the image) address pixel p's tap t as base + tapoff[t] + p * pix_stride; border blocks
// use a table xtap[p * taps + t] (a zero row where the tap is padding or the pixel is past
// the row's end).
struct BlockInput {
  const uint32_t* const* xtap;  // border blocks
  const uint32_t* base;         // interior blocks
  const int64_t* tapoff;
  int64_t pix_stride;
};

// One register block: kPix consecutive output pixels x J blocks of 16 output channels; wt
// points at the chunk's weights [K][J][16]. kWg > 0 fixes Wg at compile time (the inner
// word loop unrolls).
template <int J, bool kTernary, int kPix, int kWg, bool kInterior>
CBP_AVX512 void block_kernel(const BlockInput& in, int64_t taps, int64_t Wg_rt, const uint32_t* wt_pos,
                             const uint32_t* wt_neg, int valid_pix, int valid_lanes_last, const float* bias,
                             float scale, float* out, int64_t out_pix_stride) {
  const int64_t Wg = kWg > 0 ? kWg : Wg_rt;
  __m512i acc[kPix][J];
  for (int p = 0; p < kPix; ++p)
    for (int j = 0; j < J; ++j) acc[p][j] = _mm512_setzero_si512();
  int32_t xcount[kPix] = {};
  const uint32_t* wp_k = wt_pos;
  const uint32_t* wn_k = wt_neg;
  for (int64_t t = 0; t < taps; ++t) {
    const uint32_t* xp[kPix];
    for (int p = 0; p < kPix; ++p) xp[p] = kInterior ? in.base + in.tapoff[t] + p * in.pix_stride : in.xtap[p * taps + t];
    for (int64_t w = 0; w < Wg; ++w, wp_k += J * kLanes, wn_k += J * kLanes) {
      __m512i wp[J], wn[J];
      for (int j = 0; j < J; ++j) {
        wp[j] = _mm512_loadu_si512(wp_k + j * kLanes);
        if (kTernary) wn[j] = _mm512_loadu_si512(wn_k + j * kLanes);
      }
      for (int p = 0; p < kPix; ++p) {
        const uint32_t word = xp[p][w];
        const __m512i xb = _mm512_set1_epi32(static_cast<int>(word));
        if (!kTernary) xcount[p] += __builtin_popcount(word);
        for (int j = 0; j < J; ++j) {
          acc[p][j] = _mm512_add_epi32(acc[p][j], _mm512_popcnt_epi32(_mm512_and_si512(xb, wp[j])));
          if (kTernary) acc[p][j] = _mm512_sub_epi32(acc[p][j], _mm512_popcnt_epi32(_mm512_and_si512(xb, wn[j])));
        }
      }
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int p = 0; p < valid_pix; ++p) {
    for (int j = 0; j < J; ++j) {
      __m512i c = acc[p][j];
      if (!kTernary) c = _mm512_sub_epi32(_mm512_slli_epi32(c, 1), _mm512_set1_epi32(xcount[p]));
      const __mmask16 mask = (j == J - 1) ? static_cast<__mmask16>((1u << valid_lanes_last) - 1u) : 0xFFFF;
      const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + j * kLanes) : _mm512_setzero_ps();
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c), s), b);
      _mm512_mask_storeu_ps(out + p * out_pix_stride + j * kLanes, mask, v);
    }
  }
}

// Register block sizes: pixels x 16-channel blocks. Binary: 6 x 4 = 24 accumulators + 4
// weight registers; ternary: 4 x 4 = 16 + 8 weight registers (of 32 zmm). Chosen on the
// bench's SEW-ResNet-18 layers (binary 6 x 4 beat 4 x 4 by ~15% at 64-128 channels).
template <bool kTernary>
constexpr int pix_block() { return kTernary ? 4 : 6; }

using BlockFn = void (*)(const BlockInput&, int64_t, int64_t, const uint32_t*, const uint32_t*, int, int,
                         const float*, float, float*, int64_t);

template <bool kTernary, int kWg, bool kInterior>
BlockFn pick_j(int J) {
  constexpr int P = pix_block<kTernary>();
  switch (J) {
    case 1: return &block_kernel<1, kTernary, P, kWg, kInterior>;
    case 2: return &block_kernel<2, kTernary, P, kWg, kInterior>;
    case 3: return &block_kernel<3, kTernary, P, kWg, kInterior>;
    default: return &block_kernel<4, kTernary, P, kWg, kInterior>;
  }
}

template <bool kTernary, bool kInterior>
BlockFn pick_block(int J, int64_t Wg) {
  switch (Wg) {
    case 1: return pick_j<kTernary, 1, kInterior>(J);
    case 2: return pick_j<kTernary, 2, kInterior>(J);
    case 4: return pick_j<kTernary, 4, kInterior>(J);
    default: return pick_j<kTernary, 0, kInterior>(J);
  }
}

BlockFn pick_block(bool ternary, bool interior, int J, int64_t Wg) {
  if (ternary) return interior ? pick_block<true, true>(J, Wg) : pick_block<true, false>(J, Wg);
  return interior ? pick_block<false, true>(J, Wg) : pick_block<false, false>(J, Wg);
}

void bitconv_avx512(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                    const BitConvGeometry& g) {
  const int64_t Wg = g.words_per_group, Og = g.out_per_group, O = g.groups * Og, Cw = g.groups * Wg;
  const int64_t taps = g.KH * g.KW, K = taps * Wg;
  const int64_t OB = (Og + kLanes - 1) / kLanes;    // 16-channel blocks per group
  const int64_t chunks = (OB + kMaxJ - 1) / kMaxJ;  // register blocks (<= 4 x 16 channels) per group
  const bool ternary = g.planes == 2;
  const int P = ternary ? pix_block<true>() : pix_block<false>();
  // Weights re-laid out to [P][G][chunk][K][J][16] (J = the chunk's 16-channel blocks, lanes
  // past Og are 0), so a register block streams its weights in order; bias padded the same.
  const int64_t group_stride = OB * kLanes * K, plane_stride = g.groups * group_stride;
  std::vector<uint32_t> wt(static_cast<size_t>(g.planes * plane_stride), 0u);
  for (int64_t pl = 0; pl < g.planes; ++pl)
    for (int64_t o = 0; o < O; ++o) {
      const int64_t grp = o / Og, ol = o % Og, chunk = ol / (kMaxJ * kLanes);
      const int64_t J = std::min<int64_t>(kMaxJ, OB - chunk * kMaxJ), jl = ol % (kMaxJ * kLanes);
      uint32_t* dst = wt.data() + pl * plane_stride + grp * group_stride + chunk * kMaxJ * kLanes * K + jl;
      const uint32_t* src = planes + (pl * O + o) * K;
      for (int64_t k = 0; k < K; ++k) dst[k * J * kLanes] = src[k];
    }
  std::vector<float> bias_pad;
  if (bias) {
    bias_pad.assign(static_cast<size_t>(g.groups * OB * kLanes), 0.0f);
    for (int64_t o = 0; o < O; ++o) bias_pad[(o / Og) * OB * kLanes + o % Og] = bias[o];
  }
  const std::vector<uint32_t> zeros(static_cast<size_t>(Wg), 0u);
  std::vector<int64_t> tapoff(static_cast<size_t>(taps));
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw) tapoff[kh * g.KW + kw] = (kh * g.dil_h * g.W + kw * g.dil_w) * Cw;

  // Pixels (n, oh, ow) flattened, in blocks of P (a block may span rows: then it reads
  // through a table), and kSuper blocks per work item, so a work item reuses the chunk's
  // weights (L1) over kSuper blocks and no row end wastes a partial block.
  const int64_t pixels = g.N * g.OH * g.OW, blocks = (pixels + P - 1) / P;
  const int64_t supers = (blocks + kSuper - 1) / kSuper;

#pragma omp parallel
  {
    std::vector<const uint32_t*> xtap(static_cast<size_t>(kSuper * P * taps));  // border blocks' tables
    BlockInput in[kSuper];
    bool interior[kSuper];
#pragma omp for collapse(2) schedule(static)
    for (int64_t sb = 0; sb < supers; ++sb) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const int64_t nb = std::min<int64_t>(kSuper, blocks - sb * kSuper);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t pix0 = (sb * kSuper + i) * P;
          const int64_t ow0 = pix0 % g.OW, oh = (pix0 / g.OW) % g.OH, n = pix0 / (g.OW * g.OH);
          const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow0 * g.stride_w - g.pad_w;
          interior[i] = ow0 + P <= g.OW && ih0 >= 0 && ih0 + (g.KH - 1) * g.dil_h < g.H && iw0 >= 0 &&
                        iw0 + (P - 1) * g.stride_w + (g.KW - 1) * g.dil_w < g.W;
          const uint32_t** table = xtap.data() + i * P * taps;
          in[i] = BlockInput{table, x + ((n * g.H + ih0) * g.W + iw0) * Cw + grp * Wg, tapoff.data(), g.stride_w * Cw};
          if (interior[i]) continue;
          for (int p = 0; p < P; ++p) {
            const int64_t pix = pix0 + p;
            const int64_t pw = pix % g.OW, ph = (pix / g.OW) % g.OH, pn = pix / (g.OW * g.OH);
            for (int64_t kh = 0; kh < g.KH; ++kh) {
              const int64_t ih = ph * g.stride_h - g.pad_h + kh * g.dil_h;
              for (int64_t kw = 0; kw < g.KW; ++kw) {
                const int64_t iw = pw * g.stride_w - g.pad_w + kw * g.dil_w;
                const bool inside = pix < pixels && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
                table[p * taps + kh * g.KW + kw] = inside ? x + ((pn * g.H + ih) * g.W + iw) * Cw + grp * Wg : zeros.data();
              }
            }
          }
        }
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const int64_t ob0 = chunk * kMaxJ;
          const int J = static_cast<int>(std::min<int64_t>(kMaxJ, OB - ob0));
          const int64_t o_end = std::min<int64_t>(Og, (ob0 + J) * kLanes);
          const int valid_lanes_last = static_cast<int>(o_end - (ob0 + J - 1) * kLanes);
          const uint32_t* wpos = wt.data() + grp * group_stride + ob0 * kLanes * K;
          const uint32_t* wneg = ternary ? wpos + plane_stride : nullptr;
          const float* b = bias ? bias_pad.data() + (grp * OB + ob0) * kLanes : nullptr;
          const BlockFn interior_block = pick_block(ternary, true, J, Wg);
          const BlockFn border_block = pick_block(ternary, false, J, Wg);
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t pix0 = (sb * kSuper + i) * P;
            const int valid_pix = static_cast<int>(std::min<int64_t>(P, pixels - pix0));
            float* dst = out + pix0 * O + grp * Og + ob0 * kLanes;
            (interior[i] ? interior_block : border_block)(in[i], taps, Wg, wpos, wneg, valid_pix, valid_lanes_last, b,
                                                          scale, dst, O);
          }
        }
      }
    }
  }
}
#endif  // CBP_HAVE_X86

// x: int32 [N, H, W, G*Wg]; planes: int32 [P, O, KH, KW, Wg] (P = 1 binary, 2 ternary);
// bias: float32 [O] or None -> float32 [N, OH, OW, O].
at::Tensor bitconv2d(const at::Tensor& x, const at::Tensor& planes, double scale, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kInt && x.is_contiguous(), "bitconv2d: x must be contiguous int32 [N, H, W, Cw]");
  TORCH_CHECK(planes.dim() == 5 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              "bitconv2d: planes must be contiguous int32 [P, O, KH, KW, Wg]");
  BitConvGeometry g{};
  g.N = x.size(0); g.H = x.size(1); g.W = x.size(2);
  g.planes = planes.size(0); g.KH = planes.size(2); g.KW = planes.size(3);
  g.stride_h = stride[0]; g.stride_w = stride[1]; g.pad_h = padding[0]; g.pad_w = padding[1];
  g.dil_h = dilation[0]; g.dil_w = dilation[1];
  g.groups = groups; g.words_per_group = planes.size(4); g.out_per_group = planes.size(1) / groups;
  TORCH_CHECK(x.size(3) == groups * g.words_per_group, "bitconv2d: x has ", x.size(3), " words per pixel, planes need ",
              groups * g.words_per_group);
  g.OH = bitconv_out_size(g.H, g.KH, g.stride_h, g.pad_h, g.dil_h);
  g.OW = bitconv_out_size(g.W, g.KW, g.stride_w, g.pad_w, g.dil_w);
  const int64_t O = planes.size(1);
  auto out = at::empty({g.N, g.OH, g.OW, O}, x.options().dtype(at::kFloat));
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == at::kFloat && bias_c.numel() == O, "bitconv2d: bias must be float32 [O]");
    b = bias_c.data_ptr<float>();
  }
  if (out.numel() == 0) return out;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  const auto* wp = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
#ifdef CBP_HAVE_X86
  if (use_avx512()) {
    bitconv_avx512(xp, wp, b, static_cast<float>(scale), out.data_ptr<float>(), g);
    return out;
  }
#endif
  bitconv_portable(xp, wp, b, static_cast<float>(scale), out.data_ptr<float>(), g);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext, m) {
  m.def(
      "bitconv2d(Tensor x, Tensor planes, float scale, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) { m.impl("bitconv2d", &bitconv2d); }

}  // namespace cbp
