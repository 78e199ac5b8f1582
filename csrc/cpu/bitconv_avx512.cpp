// The AVX-512 VPOPCNTDQ path of the CPU popcount convolution (the equation and the choice
// of path: bitconv.cpp): 16 output channels per 512-bit register, register blocks of output
// pixels x 16-channel blocks, and the fused LIF epilogue on top of them.
#include "cpu/bitconv_paths.h"

#ifdef CBP_HAVE_X86
namespace cbp {
namespace bitconv_cpu {

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

}  // namespace bitconv_cpu
}  // namespace cbp
#endif  // CBP_HAVE_X86
