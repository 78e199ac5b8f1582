// Bit-packed popcount convolution on the CPU (binary and ternary weights on {0,1} spikes).
// Equation (csrc/common/bitconv_math.h): per output (n, oh, ow, o), an integer count over
// the in-bounds taps and the channel words of the group,
//   binary c = sum 2*popc(x & w) - popc(x),  ternary c = sum popc(x & p) - popc(x & n),
// then out = float(c) * scale + bias[o] (float32, two roundings), output NHWC float32.
//
// Three paths, chosen at run time:
// - AMX-INT8 (when the CPU has it, Linux grants the tile state and CBP_KERNELS_NO_AMX is
//   not 1): the same counts as an int8 matrix product, spikes unpacked to bytes {0, 1} and
//   weights to {-1, 0, 1} (see the AMX section);
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

namespace cbp {
namespace {

constexpr int kLanes = 16;    // 32-bit lanes per 512-bit register
constexpr int kMaxJ = 4;      // 16-channel blocks per register block
// Pixel blocks per OpenMP work item: 8 x 6 pixels reuse a chunk's weights (<= 37 KiB for
// 512 channels 3x3, in L1) and still give 2 cores hundreds of items on SEW-ResNet layer4.
constexpr int64_t kSuper = 8;

bool env_is_one(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

bool use_avx512() {
#ifdef CBP_HAVE_X86
  if (env_is_one("CBP_KERNELS_NO_AVX512")) return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

// ---------------------------------------------------------------- portable path
void bitconv_portable(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                      const BitConvGeometry& g) {
  const int64_t O = g.groups * g.out_per_group;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        float* dst = out + ((n * g.OH + oh) * g.OW + ow) * O;
        for (int64_t o = 0; o < O; ++o) {
          dst[o] = bitconv_epilogue(bitconv_count(x, planes, g, n, oh, ow, o), scale, bias ? bias[o] : 0.0f);
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
                             float scale, float* out, int64_t out_pix_stride, bool stream) {
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
      float* dst = out + p * out_pix_stride + j * kLanes;
      if (stream && mask == 0xFFFF && (reinterpret_cast<uintptr_t>(dst) & 63u) == 0) {
        // Streaming store: no read-for-ownership of the output lines (the float output is
        // the largest stream of a layer: -12% time on SEW-ResNet-18 layer1, -25% on 1x1 convs).
        _mm512_stream_ps(dst, v);
      } else {
        _mm512_mask_storeu_ps(dst, mask, v);
      }
    }
  }
}

// Register block sizes: pixels x 16-channel blocks. Binary: 6 x 4 = 24 accumulators + 4
// weight registers; ternary: 4 x 4 = 16 + 8 weight registers (of 32 zmm). Chosen on the
// bench's SEW-ResNet-18 layers (binary 6 x 4 beat 4 x 4 by ~15% at 64-128 channels).
template <bool kTernary>
constexpr int pix_block() { return kTernary ? 4 : 6; }

using BlockFn = void (*)(const BlockInput&, int64_t, int64_t, const uint32_t*, const uint32_t*, int, int,
                         const float*, float, float*, int64_t, bool);

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

// The AVX-512 convolution of one call: weights re-laid out once, then work items of
// kSuper pixel blocks. Pixels (n, oh, ow) are flattened in blocks of P (a block may span
// rows: then it reads through a table), so no row end wastes a partial block, and a work
// item reuses a chunk's weights (L1) over its kSuper blocks.
struct AvxConv {
  const BitConvGeometry& g;
  int64_t Wg, Og, O, Cw, taps, K, OB, chunks, group_stride, plane_stride, pixels, blocks;
  bool ternary;
  int P;
  std::vector<uint32_t> wt, zeros;
  std::vector<float> bias_pad;
  std::vector<int64_t> tapoff;

  AvxConv(const uint32_t* planes, const float* bias, const BitConvGeometry& geometry) : g(geometry) {
    Wg = g.words_per_group; Og = g.out_per_group; O = g.groups * Og; Cw = g.groups * Wg;
    taps = g.KH * g.KW; K = taps * Wg;
    OB = (Og + kLanes - 1) / kLanes;     // 16-channel blocks per group
    chunks = (OB + kMaxJ - 1) / kMaxJ;   // register blocks (<= 4 x 16 channels) per group
    ternary = g.planes == 2;
    P = ternary ? pix_block<true>() : pix_block<false>();
    pixels = g.N * g.OH * g.OW;
    blocks = (pixels + P - 1) / P;
    // Weights re-laid out to [P][G][chunk][K][J][16] (J = the chunk's 16-channel blocks,
    // lanes past Og are 0), so a register block streams its weights in order.
    group_stride = OB * kLanes * K;
    plane_stride = g.groups * group_stride;
    wt.assign(static_cast<size_t>(g.planes * plane_stride), 0u);
    for (int64_t pl = 0; pl < g.planes; ++pl)
      for (int64_t o = 0; o < O; ++o) {
        const int64_t grp = o / Og, ol = o % Og, chunk = ol / (kMaxJ * kLanes);
        const int64_t J = std::min<int64_t>(kMaxJ, OB - chunk * kMaxJ), jl = ol % (kMaxJ * kLanes);
        uint32_t* dst = wt.data() + pl * plane_stride + grp * group_stride + chunk * kMaxJ * kLanes * K + jl;
        const uint32_t* src = planes + (pl * O + o) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * J * kLanes] = src[k];
      }
    if (bias) {  // padded like the weights' lanes
      bias_pad.assign(static_cast<size_t>(g.groups * OB * kLanes), 0.0f);
      for (int64_t o = 0; o < O; ++o) bias_pad[(o / Og) * OB * kLanes + o % Og] = bias[o];
    }
    zeros.assign(static_cast<size_t>(Wg), 0u);
    tapoff.resize(static_cast<size_t>(taps));
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) tapoff[kh * g.KW + kw] = (kh * g.dil_h * g.W + kw * g.dil_w) * Cw;
  }

  // Input addressing of the nb blocks of P pixels from flattened pixel `first` (pixels from
  // `end` on are padding) of group grp: interior blocks by offsets, the others through their
  // part of xtap (kSuper * P * taps pointers).
  void setup(const uint32_t* x, int64_t grp, int64_t first, int64_t end, int64_t nb, BlockInput* in, bool* interior,
             const uint32_t** xtap) const {
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t pix0 = first + i * P;
      const int64_t ow0 = pix0 % g.OW, oh = (pix0 / g.OW) % g.OH, n = pix0 / (g.OW * g.OH);
      const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow0 * g.stride_w - g.pad_w;
      interior[i] = pix0 + P <= end && ow0 + P <= g.OW && ih0 >= 0 && ih0 + (g.KH - 1) * g.dil_h < g.H && iw0 >= 0 &&
                    iw0 + (P - 1) * g.stride_w + (g.KW - 1) * g.dil_w < g.W;
      const uint32_t** table = xtap + i * P * taps;
      in[i] = BlockInput{table, x + ((n * g.H + ih0) * g.W + iw0) * Cw + grp * Wg, tapoff.data(), g.stride_w * Cw};
      if (interior[i]) continue;
      for (int p = 0; p < P; ++p) {
        const int64_t pix = pix0 + p;
        const int64_t pw = pix % g.OW, ph = (pix / g.OW) % g.OH, pn = pix / (g.OW * g.OH);
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = ph * g.stride_h - g.pad_h + kh * g.dil_h;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t iw = pw * g.stride_w - g.pad_w + kw * g.dil_w;
            const bool inside = pix < end && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
            table[p * taps + kh * g.KW + kw] = inside ? x + ((pn * g.H + ih) * g.W + iw) * Cw + grp * Wg : zeros.data();
          }
        }
      }
    }
  }

  struct Chunk {
    int J, valid_lanes_last;
    const uint32_t *wpos, *wneg;
    const float* bias;
    BlockFn interior, border;
  };

  Chunk chunk(int64_t grp, int64_t c) const {
    const int64_t ob0 = c * kMaxJ;
    const int J = static_cast<int>(std::min<int64_t>(kMaxJ, OB - ob0));
    const int64_t o_end = std::min<int64_t>(Og, (ob0 + J) * kLanes);
    const uint32_t* wpos = wt.data() + grp * group_stride + ob0 * kLanes * K;
    return Chunk{J, static_cast<int>(o_end - (ob0 + J - 1) * kLanes), wpos, ternary ? wpos + plane_stride : nullptr,
                 bias_pad.empty() ? nullptr : bias_pad.data() + (grp * OB + ob0) * kLanes,
                 pick_block(ternary, true, J, Wg), pick_block(ternary, false, J, Wg)};
  }

  // out[pixel][channel of the chunk] = float(c) * scale + bias for kPix pixels of block i
  // (stream: non-temporal stores, for an output that is not read back soon).
  void run(const Chunk& ch, const BlockInput& in, bool interior, int valid_pix, float scale, float* out,
           int64_t out_pix_stride, bool stream) const {
    (interior ? ch.interior : ch.border)(in, taps, Wg, ch.wpos, ch.wneg, valid_pix, ch.valid_lanes_last, ch.bias,
                                         scale, out, out_pix_stride, stream);
  }
};

void bitconv_avx512(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                    const BitConvGeometry& g) {
  const AvxConv conv(planes, bias, g);
  const int64_t supers = (conv.blocks + kSuper - 1) / kSuper;
#pragma omp parallel
  {
    std::vector<const uint32_t*> xtap(static_cast<size_t>(kSuper * conv.P * conv.taps));
    BlockInput in[kSuper];
    bool interior[kSuper];
#pragma omp for collapse(2) schedule(static)
    for (int64_t sb = 0; sb < supers; ++sb) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const int64_t nb = std::min<int64_t>(kSuper, conv.blocks - sb * kSuper);
        conv.setup(x, grp, sb * kSuper * conv.P, conv.pixels, nb, in, interior, xtap.data());
        for (int64_t c = 0; c < conv.chunks; ++c) {
          const AvxConv::Chunk ch = conv.chunk(grp, c);
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t pix0 = (sb * kSuper + i) * conv.P;
            const int valid_pix = static_cast<int>(std::min<int64_t>(conv.P, conv.pixels - pix0));
            conv.run(ch, in[i], interior[i], valid_pix, scale, out + pix0 * conv.O + grp * conv.Og + c * kMaxJ * kLanes,
                     conv.O, true);
          }
        }
      }
    }
    _mm_sfence();  // order this thread's streaming stores before the results are read
  }
}

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
CBP_AVX512 void lif_tile(const float* c, const float* mul, const float* add, float* v, int64_t width, float k,
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

// Fused epilogue: y = float(c) * mul[o] + add[o], then the neuron over T timesteps
// (csrc/common/neuron_math.h: charge, fire S = (H - V_th >= 0), reset), the spikes packed
// along the output channels. x holds T images per sample ([T * Nb, H, W, Cw], t major); a
// work item keeps the membrane of its kSuper blocks x 64 channels in a local buffer and
// walks time inside, so no float activation is written. Output words o0/32 onwards of a
// chunk: the op requires o0 % 32 == 0 (groups == 1 or Og % 32 == 0).
void bitconv_lif_avx512(const uint32_t* x, const uint32_t* planes, const float* mul, const float* add,
                        const BitConvGeometry& g, int64_t T, float k, const NeuronParams& np, uint32_t* spikes,
                        float* v_last) {
  const AvxConv conv(planes, nullptr, g);
  const int64_t Q = g.N / T * g.OH * g.OW;  // output pixels per timestep
  const int64_t blocks = (Q + conv.P - 1) / conv.P, supers = (blocks + kSuper - 1) / kSuper;
  const int64_t Wo = (conv.O + 31) / 32, tile_w = kMaxJ * kLanes;
  const float v0 = np.soft_reset ? 0.0f : np.v_reset;
#pragma omp parallel
  {
    std::vector<const uint32_t*> xtap(static_cast<size_t>(T * kSuper * conv.P * conv.taps));
    std::vector<BlockInput> in(static_cast<size_t>(T * kSuper));
    std::vector<char> interior(static_cast<size_t>(T * kSuper));
    std::vector<float> tile(static_cast<size_t>(conv.P * tile_w)), v(static_cast<size_t>(kSuper * conv.P * tile_w));
#pragma omp for collapse(2) schedule(static)
    for (int64_t sb = 0; sb < supers; ++sb) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const int64_t nb = std::min<int64_t>(kSuper, blocks - sb * kSuper);
        for (int64_t t = 0; t < T; ++t) {
          bool flags[kSuper];
          conv.setup(x, grp, t * Q + sb * kSuper * conv.P, (t + 1) * Q, nb, in.data() + t * kSuper, flags,
                     xtap.data() + t * kSuper * conv.P * conv.taps);
          std::copy(flags, flags + nb, interior.begin() + t * kSuper);
        }
        for (int64_t c = 0; c < conv.chunks; ++c) {
          const AvxConv::Chunk ch = conv.chunk(grp, c);
          const int64_t o0 = grp * conv.Og + c * tile_w, width = std::min<int64_t>(tile_w, conv.Og - c * tile_w);
          std::fill(v.begin(), v.end(), v0);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t i = 0; i < nb; ++i) {
              const int64_t q0 = (sb * kSuper + i) * conv.P;
              const int valid = static_cast<int>(std::min<int64_t>(conv.P, Q - q0));
              conv.run(ch, in[t * kSuper + i], interior[t * kSuper + i], valid, 1.0f, tile.data(), tile_w, false);
              for (int p = 0; p < valid; ++p) {
                uint32_t* dst = spikes + (t * Q + q0 + p) * Wo + o0 / 32;
                lif_tile(tile.data() + p * tile_w, mul + o0, add + o0, v.data() + (i * conv.P + p) * tile_w, width, k, np,
                         dst);
              }
            }
          }
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t q0 = (sb * kSuper + i) * conv.P;
            for (int64_t p = 0; p < std::min<int64_t>(conv.P, Q - q0); ++p)
              std::copy(v.data() + (i * conv.P + p) * tile_w, v.data() + (i * conv.P + p) * tile_w + width,
                        v_last + (q0 + p) * conv.O + o0);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- AMX-INT8 path
// The convolution of each group as an int8 matrix product on the AMX tile unit (Sapphire
// Rapids and later): for output pixel P and output channel o of group grp,
//   c[P][o] = sum_k A[P][k] * B[k][o],  k over (tap, input channel),
// A[P][k] = the {0, 1} spike that tap reads (0 for padding), B[k][o] = the weight level in
// {-1, 0, 1} (binary 2*bit - 1, ternary pos - neg): exact int32 sums, the count c of
// csrc/common/bitconv_math.h. TDPBUSD does 16 x 16 x 64 of these multiply-adds per
// instruction (~870 per cycle measured on one core, vs ~340 at best for the AND + VPOPCNT
// + ADD of the AVX-512 path). Addressing without im2col: the input is split into the
// stride's phases, phase (ph, pw) holding input pixel (i*stride_h + ph - pad_h,
// j*stride_w + pw - pad_w) at grid position (i, j) < (Hs, Ws), zero where that is padding.
// Output pixel (oh, ow) is "virtual row" v = oh*Ws + ow of its image (rows with ow >= OW are
// computed and dropped) and reads tap (kh, kw) at v + (kh*dil_h / stride_h)*Ws +
// kw*dil_w / stride_w of phase ((kh*dil_h) % stride_h, (kw*dil_w) % stride_w): 16
// consecutive rows are 16 equally spaced rows of bytes, one tile load. A work item (a run of
// 32-row blocks) per thread:
//  1. unpacks its window of every phase to bytes (32 per spike word, groups one after the
//     other), the rows it reads plus the kernel's reach, L2-resident;
//  2. per 32 output channels, expands the weights to two AMX B tiles per 64-byte column
//     block k (VNNI layout [16 rows][16 o][4 k bytes]); the taps of one kernel row and phase
//     are consecutive pixels of the window, so K runs over them without padding each tap's
//     channels to 64 (3 taps of 32 channels: 96 bytes, 2 column blocks, not 3);
//  3. per block: 2 x 2 tiles of 16 x 16 counts over K, then the epilogue on its valid rows
//     (float scale + bias, or the LIF step over the T timesteps).
#define CBP_AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))

// Output pixels (all images) below which the AVX-512 path runs instead: the AMX path expands
// all O x K weight bytes per call (16 pixels: AMX 2-3x slower, 64: a tie, 196: AMX 20% faster).
constexpr int64_t kAmxMinPixels = 128;

// True when the layer has kAmxMinPixels, the CPU has AMX-INT8, Linux grants this process the
// tile state and CBP_KERNELS_NO_AMX is not 1 (set, it tests the AVX-512 path).
bool use_amx(const BitConvGeometry& g) {
  if (g.N * g.OH * g.OW < kAmxMinPixels || env_is_one("CBP_KERNELS_NO_AMX") || !use_avx512() ||
      !__builtin_cpu_supports("avx512bw"))
    return false;
#ifdef __linux__
  static const bool granted = [] {
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0 || (d & (3u << 24)) != (3u << 24)) return false;  // AMX-TILE, -INT8
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;
template <typename T>
Buffer<T> buffer64(int64_t n) {  // uninitialised, 64-byte aligned
  return Buffer<T>(static_cast<T*>(std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64)));
}

constexpr int64_t kTileBytes = 1024;  // 16 rows x 64 bytes
constexpr int64_t kRows = 32;         // virtual rows per block (2 A tiles)
// Window bytes of a work item (L2-resident while it walks the output channels): 256 and
// 512 KiB tie on the bench's layers, 128 KiB and 1 MiB are up to 20% slower.
constexpr int64_t kItemBytes = 512 * 1024;
// Column blocks per pass (see run): 12-16 beat one pass by 5-15% on SEW-ResNet-18's layer3
// conv and layer4.0.conv1, lose 5% on layer4 conv; 8 loses 5-30% everywhere.
constexpr int64_t kStepMax = 16;

// Tiles 0-3: the 2 x 2 blocks of counts; 4-5: A; 6-7: B; all 16 rows x 64 bytes. The palette
// is a constant in memory, not a stack copy:
// GCC may drop the stores to a local struct whose only reader is LDTILECFG (seen when this
// function was not inlined: the tiles then ran unconfigured and TILEZERO raised SIGILL).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr TileConfig kTileConfig{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

CBP_AMX void amx_tile_config() { _tile_loadconfig(&kTileConfig); }

struct AmxConv {
  const BitConvGeometry& g;
  const uint32_t* x;
  const uint32_t* planes;
  int64_t O, Og, Wg, Cb, pix, Hs, Ws, grid, Vimg, pitch, blocks, halo, Kc = 0;
  std::vector<int64_t> koff;   // [k]: byte offset of A column block k from a row in phase (0, 0) of a window
  std::vector<int64_t> kword;  // [2k + h]: weight word (tap * Wg + w) of its bytes 32h .. 32h + 32, or -1
  std::vector<char> used_phase;  // [ph * stride_w + pw]: some tap reads it
  int64_t images, T;  // images per timestep, timesteps (t major in x)
  int64_t per_item, items, Lwin;

  AmxConv(const uint32_t* spikes, const uint32_t* weights, const BitConvGeometry& geometry, int64_t timesteps)
      : g(geometry), x(spikes), planes(weights), images(geometry.N / timesteps), T(timesteps) {
    Og = g.out_per_group; O = g.groups * Og; Wg = g.words_per_group;
    Cb = 32 * Wg; pix = g.groups * Cb;
    Hs = (g.H + 2 * g.pad_h + g.stride_h - 1) / g.stride_h;
    Ws = (g.W + 2 * g.pad_w + g.stride_w - 1) / g.stride_w;
    grid = Hs * Ws;
    Vimg = (g.OH - 1) * Ws + g.OW;  // virtual rows up to an image's last output pixel
    // Blocks of 32 virtual rows u = n * pitch + v: each image in whole blocks (pitch = Vimg
    // rounded up), or the images' grids back to back (pitch = grid: a block runs on into the
    // next image, rows that stay equally spaced), whichever needs fewer blocks (the latter
    // for small images, 1 x 1 for packed_linear).
    const int64_t own = images * ((Vimg + kRows - 1) / kRows), shared = ((images - 1) * grid + Vimg + kRows - 1) / kRows;
    pitch = own <= shared ? (Vimg + kRows - 1) / kRows * kRows : grid;
    blocks = std::min(own, shared);
    halo = ((g.KH - 1) * g.dil_h / g.stride_h) * Ws + (g.KW - 1) * g.dil_w / g.stride_w;
    // Work items of per_item blocks: their windows within kItemBytes, at least one item per thread.
    const int64_t threads = omp_get_max_threads();
    const int64_t budget = std::max<int64_t>(1, kItemBytes / (T * g.stride_h * g.stride_w * kRows * pix));
    per_item = std::min(budget, (blocks + threads - 1) / threads);
    items = (blocks + per_item - 1) / per_item;
    used_phase.assign(static_cast<size_t>(g.stride_h * g.stride_w), 0);
    Lwin = 0;  // window rows per phase: the largest span of an item's rows (+ halo, + a chunk's overhang)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b0 = it * per_item, b1 = std::min(blocks, b0 + per_item) - 1;
      Lwin = std::max(Lwin, row_of(b1) + kRows - row_of(b0) + halo + 2);
    }
    // K: per (kh, phase pw), runs of taps on consecutive pixels of the window (one run when
    // dil_w is 1 or stride_w and groups == 1), each cut into 64-byte column blocks; the last
    // block of a run reads past it into weights 0.
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t pw = 0; pw < g.stride_w; ++pw) {
        std::vector<int64_t> run;  // taps of the current run
        int64_t p0 = 0;
        for (int64_t kw = 0; kw <= g.KW; ++kw) {
          const bool in_phase = kw < g.KW && (kw * g.dil_w) % g.stride_w == pw;
          const int64_t p = kw < g.KW ? (kh * g.dil_h / g.stride_h) * Ws + kw * g.dil_w / g.stride_w : 0;
          if (!run.empty() && (kw == g.KW || (in_phase && (g.groups > 1 || p != p0 + static_cast<int64_t>(run.size()))))) {
            add_run(run, ((kh * g.dil_h) % g.stride_h) * g.stride_w + pw, p0);
            run.clear();
          }
          if (in_phase) {
            if (run.empty()) p0 = p;
            run.push_back(kh * g.KW + kw);
          }
        }
      }
  }

  // Window row (image n, virtual row v) of block b's first row: n * grid + v.
  int64_t row_of(int64_t b) const { return b * kRows / pitch * grid + b * kRows % pitch; }

  void add_run(const std::vector<int64_t>& taps, int64_t phase, int64_t p0) {
    const int64_t bytes = static_cast<int64_t>(taps.size()) * Cb;
    used_phase[phase] = 1;
    for (int64_t b = 0; b < bytes; b += 64, ++Kc) {
      koff.push_back(phase * Lwin * pix + p0 * pix + b);
      for (int64_t h = b; h < b + 64; h += 32) kword.push_back(h < bytes ? taps[h / Cb] * Wg + h % Cb / 32 : -1);
    }
  }

  // Window of the images from image0 (one timestep): grid rows [lo, lo + Lwin) of every
  // phase a tap reads; byte 32w + i of a pixel = bit i of its word w (groups one after
  // another), 0 for padding and past the last image. Segment by segment of one grid row:
  // zeros, the columns inside the image (one contiguous run of words for stride_w == 1), zeros.
  CBP_AMX void unpack(int64_t image0, int64_t lo, uint8_t* win) const {
    const int64_t words = g.groups * Wg, s = g.stride_w;
    for (int64_t phase = 0; phase < g.stride_h * s; ++phase) {
      if (!used_phase[phase]) continue;
      const int64_t ph = phase / s, pw = phase % s;
      const int64_t jb_img = g.pad_w > pw ? (g.pad_w - pw + s - 1) / s : 0;  // first j with iw >= 0
      const int64_t je_img = g.W + g.pad_w > pw ? (g.W + g.pad_w - pw + s - 1) / s : 0;  // first j with iw >= W
      uint8_t* dst = win + phase * Lwin * pix;
      for (int64_t r = lo; r < lo + Lwin;) {
        const int64_t n = r / grid, i = r / Ws % Hs, j0 = r % Ws, j1 = std::min(Ws, j0 + lo + Lwin - r);
        const int64_t ih = i * g.stride_h + ph - g.pad_h;
        const bool row_in = n < images && ih >= 0 && ih < g.H;
        const int64_t jb = row_in ? std::clamp(jb_img, j0, j1) : j1, je = row_in ? std::clamp(je_img, jb, j1) : j1;
        std::memset(dst, 0, (jb - j0) * pix);
        const uint32_t* src = x + (((image0 + n) * g.H + ih) * g.W + jb * s + pw - g.pad_w) * words;
        if (s == 1) {
          expand_bits(src, (je - jb) * words, dst + (jb - j0) * pix);
        } else {
          for (int64_t j = jb; j < je; ++j) expand_bits(src + (j - jb) * s * words, words, dst + (j - j0) * pix);
        }
        std::memset(dst + (je - j0) * pix, 0, (j1 - je) * pix);
        dst += (j1 - j0) * pix;
        r += j1 - j0;
      }
    }
  }

  // dst[32w + i] = bit i of src[w] for `count` words.
  CBP_AMX static void expand_bits(const uint32_t* src, int64_t count, uint8_t* dst) {
    int64_t w = 0;
    for (; w + 2 <= count; w += 2) {
      uint64_t pair;
      std::memcpy(&pair, src + w, 8);
      _mm512_storeu_si512(dst + 32 * w, _mm512_maskz_mov_epi8(_cvtu64_mask64(pair), _mm512_set1_epi8(1)));
    }
    if (w < count)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * w),
                          _mm256_maskz_mov_epi8(_cvtu32_mask32(src[w]), _mm256_set1_epi8(1)));
  }

  // B tiles of output channels 32*ob .. +32 of group grp: bt[h16][k] (h16: 16-channel half),
  // row r, lane o, byte j = level of k-byte 4r + j: bit 4*(r % 8) + j of weight word
  // kword[2k + r / 8]. Per 8 rows: gather that word of the 16 channels, then each row maps
  // 4 bits per lane to 4 bytes through a 16-entry table (VPERMD): binary +-1, ternary pos - neg.
  CBP_AMX void expand_weights(int64_t grp, int64_t ob, int8_t* bt) const {
    const int64_t Kw = g.KH * g.KW * Wg;
    alignas(64) int32_t bits[16], signs[16];  // nibble -> its 4 bits as bytes {0, 1} / {-1, 1}
    for (int v = 0; v < 16; ++v) {
      bits[v] = signs[v] = 0;
      for (int j = 0; j < 4; ++j) {
        bits[v] |= (v >> j & 1) << (8 * j);
        signs[v] |= static_cast<int32_t>((v >> j & 1 ? 0x01u : 0xFFu) << (8 * j));
      }
    }
    const __m512i lut_bits = _mm512_load_si512(bits), lut_signs = _mm512_load_si512(signs);
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(Kw)));
    for (int64_t h16 = 0; h16 < 2; ++h16) {
      const int64_t o = ob * 32 + h16 * 16, left = Og - o;
      const __mmask16 valid = left <= 0 ? 0 : left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
      const uint32_t* wrow = planes + (grp * Og + std::min(o, Og - 1)) * Kw;
      int8_t* half = bt + h16 * Kc * kTileBytes;
      for (int64_t kh = 0; kh < 2 * Kc; ++kh, half += kTileBytes / 2) {
        const __mmask16 m = kword[kh] >= 0 ? valid : 0;  // lanes of real weights; the others are 0
        const uint32_t* src = wrow + std::max<int64_t>(kword[kh], 0);
        __m512i p = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lane, src, 4);
        if (g.planes == 2) {
          __m512i q = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lane, src + O * Kw, 4);
          for (int r = 0; r < 8; ++r, p = _mm512_srli_epi32(p, 4), q = _mm512_srli_epi32(q, 4))
            _mm512_storeu_si512(half + r * 64, _mm512_sub_epi8(_mm512_permutexvar_epi32(p, lut_bits),
                                                               _mm512_permutexvar_epi32(q, lut_bits)));
        } else {
          for (int r = 0; r < 8; ++r, p = _mm512_srli_epi32(p, 4))
            _mm512_storeu_si512(half + r * 64, _mm512_maskz_permutexvar_epi32(m, p, lut_signs));
        }
      }
    }
  }

  // cnt[r][0..32) (+)= the counts over column blocks [k0, k1) of the 32 window rows from `a`
  // (group grp's bytes of the first row) and the 32 output channels of bt.
  CBP_AMX void counts(const uint8_t* a, const int8_t* bt, int64_t k0, int64_t k1, int32_t* cnt) const {
    const int8_t* b1 = bt + Kc * kTileBytes;
    if (k0 == 0) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
      _tile_loadd(0, cnt, 128); _tile_loadd(1, cnt + 16, 128);
      _tile_loadd(2, cnt + 16 * 32, 128); _tile_loadd(3, cnt + 16 * 32 + 16, 128);
    }
    for (int64_t k = k0; k < k1; ++k) {
      _tile_loadd(4, a + koff[k], pix);
      _tile_loadd(5, a + 16 * pix + koff[k], pix);
      _tile_loadd(6, bt + k * kTileBytes, 64);
      _tile_loadd(7, b1 + k * kTileBytes, 64);
      _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, cnt, 128); _tile_stored(1, cnt + 16, 128);
    _tile_stored(2, cnt + 16 * 32, 128); _tile_stored(3, cnt + 16 * 32 + 16, 128);
  }

  // The convolution, work item by work item: unpack the item's windows, then per 32 output
  // channels expand the weights and run the item's blocks; epi(cnt, q, o0, width) gets the
  // counts cnt[t * 1024 + 0 .. width) of output pixel q (of one timestep), channels
  // o0 .. o0 + width, per valid row.
  template <typename Epilogue>
  CBP_AMX void run(const Epilogue& epi) const {
    const int64_t win_bytes = g.stride_h * g.stride_w * Lwin * pix;
    // Column blocks per pass over the item's blocks: the pass's B tiles (2 x 16 KiB) stay in
    // L1; with more passes the counts of each block wait in cnt between passes.
    const int64_t passes = (Kc + kStepMax - 1) / kStepMax, k_step = (Kc + passes - 1) / passes;
#pragma omp parallel
    {
      amx_tile_config();
      const Buffer<uint8_t> win = buffer64<uint8_t>(T * win_bytes);
      const Buffer<int8_t> bt = buffer64<int8_t>(2 * Kc * kTileBytes);
      const Buffer<int32_t> cnt = buffer64<int32_t>((passes > 1 ? per_item : 1) * T * kRows * 32);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b0 = it * per_item, b1 = std::min(blocks, b0 + per_item), lo = row_of(b0);
        for (int64_t t = 0; t < T; ++t) unpack(t * images, lo, win.get() + t * win_bytes);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t ob = 0; ob < (Og + 31) / 32; ++ob) {
            expand_weights(grp, ob, bt.get());
            const int64_t o0 = grp * Og + ob * 32, width = std::min<int64_t>(32, Og - ob * 32);
            for (int64_t k0 = 0; k0 < Kc; k0 += k_step) {
              for (int64_t b = b0; b < b1; ++b) {
                int32_t* cb = cnt.get() + (k_step < Kc ? b - b0 : 0) * T * kRows * 32;
                const uint8_t* a = win.get() + (row_of(b) - lo) * pix + grp * Cb;
                for (int64_t t = 0; t < T; ++t)
                  counts(a + t * win_bytes, bt.get(), k0, std::min(Kc, k0 + k_step), cb + t * kRows * 32);
                if (k0 + k_step < Kc) continue;
                int64_t n = b * kRows / pitch, v = b * kRows % pitch, oh = v / Ws, ow = v % Ws;
                for (int64_t r = 0; r < kRows && n < images; ++r) {
                  if (v < Vimg && ow < g.OW) epi(cb + r * 32, (n * g.OH + oh) * g.OW + ow, o0, width);
                  if (++ow == Ws) ow = 0, ++oh;
                  if (++v == pitch) v = oh = ow = 0, ++n;
                }
              }
            }
          }
        }
      }
      _tile_release();
      _mm_sfence();  // order this thread's streaming stores (StoreScaled) before the results are read
    }
  }
};

// out[q][o0 .. o0 + width) = float(c) * scale + bias (width <= 32).
struct StoreScaled {
  float scale;
  const float* bias;
  float* out;
  int64_t O;
  CBP_AMX void operator()(const int32_t* cnt, int64_t q, int64_t o0, int64_t width) const {
    const __m512 s = _mm512_set1_ps(scale);
    float* dst = out + q * O + o0;
    for (int64_t l0 = 0; l0 < width; l0 += kLanes) {
      const __mmask16 m = static_cast<__mmask16>(width - l0 >= kLanes ? 0xFFFFu : (1u << (width - l0)) - 1u);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + o0 + l0) : _mm512_setzero_ps();
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(cnt + l0)), s), b);
      if (m == 0xFFFF && (reinterpret_cast<uintptr_t>(dst + l0) & 63u) == 0) {
        _mm512_stream_ps(dst + l0, v);  // no read-for-ownership of the output lines (see block_kernel)
      } else {
        _mm512_mask_storeu_ps(dst + l0, m, v);
      }
    }
  }
};

// The neuron over the T timesteps of output pixel q (lif_step16, the membrane in registers);
// spikes to word o0 / 32 (o0 % 32 == 0, as the op requires), the last membrane to v_last.
struct LifSteps {
  const float *mul, *add;
  float k;
  const NeuronParams& np;
  int64_t T, Q, O;
  uint32_t* spikes;
  float* v_last;
  CBP_AMX void operator()(const int32_t* cnt, int64_t q, int64_t o0, int64_t width) const {
    const int64_t Wo = (O + 31) / 32;
    for (int64_t l0 = 0; l0 < width; l0 += kLanes) {
      const __mmask16 m = static_cast<__mmask16>(width - l0 >= kLanes ? 0xFFFFu : (1u << (width - l0)) - 1u);
      const __m512 mu = _mm512_maskz_loadu_ps(m, mul + o0 + l0), ad = _mm512_maskz_loadu_ps(m, add + o0 + l0);
      __m512 v = _mm512_set1_ps(np.v_reset);  // 0 for the soft reset
      uint32_t* dst = spikes + q * Wo + o0 / 32;
      for (int64_t t = 0; t < T; ++t, dst += Q * Wo) {
        const __m512 c = _mm512_cvtepi32_ps(_mm512_loadu_si512(cnt + t * kRows * 32 + l0));
        const uint32_t fire = lif_step16(c, mu, ad, v, m, k, np);
        *dst = l0 == 0 ? fire : *dst | fire << 16;
      }
      _mm512_mask_storeu_ps(v_last + q * O + o0 + l0, m, v);
    }
  }
};

void bitconv_amx(const uint32_t* x, const uint32_t* planes, const float* bias, float scale, float* out,
                 const BitConvGeometry& g) {
  const AmxConv conv(x, planes, g, 1);
  conv.run(StoreScaled{scale, bias, out, conv.O});
}

void bitconv_lif_amx(const uint32_t* x, const uint32_t* planes, const float* mul, const float* add,
                     const BitConvGeometry& g, int64_t T, float k, const NeuronParams& np, uint32_t* spikes,
                     float* v_last) {
  const AmxConv conv(x, planes, g, T);
  conv.run(LifSteps{mul, add, k, np, T, g.N / T * g.OH * g.OW, conv.O, spikes, v_last});
}

#endif  // CBP_HAVE_X86

// The fused epilogue one output at a time (the portable path of bitconv2d_lif).
void bitconv_lif_portable(const uint32_t* x, const uint32_t* planes, const float* mul, const float* add,
                          const BitConvGeometry& g, int64_t T, float k, const NeuronParams& np, uint32_t* spikes,
                          float* v_last) {
  const int64_t O = g.groups * g.out_per_group, Nb = g.N / T, Wo = (O + 31) / 32;
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t n = 0; n < Nb; ++n) {
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t q = (n * g.OH + oh) * g.OW + ow, Q = Nb * g.OH * g.OW;
        for (int64_t t = 0; t < T; ++t) std::fill_n(spikes + (t * Q + q) * Wo, Wo, 0u);
        for (int64_t o = 0; o < O; ++o) {
          float v = np.v_reset;  // 0 for the soft reset
          for (int64_t t = 0; t < T; ++t) {
            const int32_t c = bitconv_count(x, planes, g, t * Nb + n, oh, ow, o);
            const bool s = neuron_step(v, bitconv_epilogue(c, mul[o], add[o]), k, np);
            spikes[(t * Q + q) * Wo + o / 32] |= static_cast<uint32_t>(s) << (o % 32);
          }
          v_last[q * O + o] = v;
        }
      }
    }
  }
}

// x: int32 [T*Nb, H, W, G*Wg] (t major), planes [P, O, KH, KW, Wg], mul / add float32 [O]
// -> (spikes int32 [T*Nb, OH, OW, ceil(O/32)], v_last float32 [Nb, OH, OW, O]).
std::tuple<at::Tensor, at::Tensor> bitconv2d_lif(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& mul,
                                                 const at::Tensor& add, at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, int64_t T, double decay,
                                                 double v_threshold, double v_reset, bool soft_reset, int64_t kind,
                                                 bool decay_input) {
  const BitConvLifCall c = bitconv_lif_call(x, planes, mul, add, stride, padding, dilation, groups, T, v_threshold,
                                            v_reset, soft_reset, kind, decay_input);
  if (c.v_last.numel() == 0) return {c.spikes, c.v_last};
  const auto lif = [&] {
#ifdef CBP_HAVE_X86
    if (use_amx(c.g)) return &bitconv_lif_amx;
    if (use_avx512()) return &bitconv_lif_avx512;
#endif
    return &bitconv_lif_portable;
  }();
  lif(c.x, c.planes, c.mul.data_ptr<float>(), c.add.data_ptr<float>(), c.g, T, static_cast<float>(decay), c.np,
      c.spikes_ptr, c.v_last.data_ptr<float>());
  return {c.spikes, c.v_last};
}

// x: int32 [N, H, W, G*Wg]; planes: int32 [P, O, KH, KW, Wg] (P = 1 binary, 2 ternary);
// bias: float32 [O] or None -> float32 [N, OH, OW, O].
at::Tensor bitconv2d(const at::Tensor& x, const at::Tensor& planes, double scale, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const BitConvCall c = bitconv_call(x, planes, bias, stride, padding, dilation, groups);
  if (c.out.numel() == 0) return c.out;
#ifdef CBP_HAVE_X86
  if (use_amx(c.g)) {
    bitconv_amx(c.x, c.planes, c.bias_ptr, static_cast<float>(scale), c.out_ptr, c.g);
    return c.out;
  }
  if (use_avx512()) {
    bitconv_avx512(c.x, c.planes, c.bias_ptr, static_cast<float>(scale), c.out_ptr, c.g);
    return c.out;
  }
#endif
  bitconv_portable(c.x, c.planes, c.bias_ptr, static_cast<float>(scale), c.out_ptr, c.g);
  return c.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext, m) {
  m.def(
      "bitconv2d(Tensor x, Tensor planes, float scale, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  m.def(
      "bitconv2d_lif(Tensor x, Tensor planes, Tensor mul, Tensor add, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int T, float decay, float v_threshold, float v_reset, bool soft_reset, "
      "int kind, bool decay_input) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  m.impl("bitconv2d", &bitconv2d);
  m.impl("bitconv2d_lif", &bitconv2d_lif);
}

}  // namespace cbp
