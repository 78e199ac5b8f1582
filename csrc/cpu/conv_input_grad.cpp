// The input gradient of a convolution on the AMX-BF16 tile unit
// (csrc/common/conv_input_grad_api.h: the equation, the op's contract):
//   grad_x[n, c, ih, iw] = alpha * sum_{o, kh, kw} grad_y[n, o, oh, ow] * weight[o, c, kh, kw],
//   ih = oh*sh - ph + kh, iw = ow*sw - pw + kw.
// Exactness: grad_y is split into three bfloat16 parts, g = g1 + g2 + g3 (truncation, cpu/bf16_split.h:
// g1 = bits(g) & 0xFFFF0000, g2 = the same of g - g1, g3 = g - g1 - g2; each exact in
// float32, 8 + 8 + 8 significant bits). A weight exact in bfloat16 (CBP's levels) is its own
// one part, so every product g_i * w is exact in float32 and TDPBF16PS sums the 3 products in
// float32: the exact products summed in float32 in an unspecified order (oneDNN's float32 sums
// them in another). Any other weight is split by the same rule, w = w1 + w2 + w3, and the pairs
// i + j <= 4 are summed (6 products: g1 w1, g2 w1, g3 w1, g1 w2, g2 w2, g1 w3); with truncation
// |g2| + |g3| < 2^-7 |g| and |g3| < 2^-15 |g| (w alike, parts of one sign), so the dropped
// g2 w3 + g3 w2 + g3 w3 are below (|g2| + |g3|) |w3| + |g3| |w2| < 2^-21 |g w| per product:
// |grad_x - exact| <= float32 summation error + 2^-21 alpha sum |g| |w| (tests: 2 K 2^-24 + 2^-21
// times that sum, K = O KH KW). AMX reads bfloat16 denormals as 0: parts below 2^-126 are lost
// (|g|, |w| >= 2^-102 split into normal parts; below, each lost part is under 2^-126), and the
// result is flushed below 2^-126. Non-finite g or w (inf - inf in the split) gives NaN where ATen
// may give inf. A window of grad_y exact in bfloat16 (parts 2 and 3 all 0, e.g. gradients that
// vanish there) skips those parts: 1 product per
// multiply-add for a weight exact in bfloat16, 3 for a float32 weight.
//
// Phases: input pixels ih = ih0_a + i*sh with (ih + ph) % sh == a read the taps kh = a + m*sh
// (m = 0, 1, ...) at oh = i + q_a - m (q_a = (ih0_a + ph - a) / sh): per phase (a, b) a
// stride-1 correlation of grad_y with its taps (stride 1: one phase, the full kernel flipped).
// grad_y lies in a grid of Hp x Wp pixels per image, images back to back: rows of OW values
// then zeros to Wp, OH such rows then zero rows to Hp (a read before the first column / row
// lands in the previous row's / image's zeros: one zero column serves both sides, see Dim);
// phase pixel (n, i, j) is "virtual row" u = n*Hp*Wp + i*Wp + j and tap (m_h, m_w) reads grid
// pixel u + (q_a - m_h)*Wp + (q_b - m_w): 16 consecutive u are one tile load, the tap moves
// its start (virtual rows with i >= Hi or j >= Wj are computed and dropped, as the popcount
// conv's, bitconv_amx.cpp).
// The product: M = virtual rows, N = input channels c, K = (tap, o):
//   A (16 pixels x 32 o bf16): grad_y's parts as [part][pixel][O] (NHWC), split and transposed
//     from NCHW per work item into an L2-resident window; a tap moves the tile's first row by
//     whole rows, so every tile row is one aligned 64-byte line (rows shifted by a pixel inside
//     the lines, as a [o][pixel] layout would have, run at half speed from L2: measured);
//   B (16 o-pairs x 16 c x 2 bf16, VNNI): the weight's parts, [c block][part][k][16 o-pairs][16 c][2],
//     prepared once per call;
//   per K step the kept pairs (grad_y part i, weight part j) in a walk that changes one
//   operand at a time (2 A or 2 B tiles loaded per pair) -> 4 TDPBF16PS per pair into 2 x 2 C
//   tiles (32 pixels x 32 c; 12 per step for one weight part, 24 for three); the epilogue
//   transposes them (16 x 16 in registers), scales by alpha and writes each channel's runs of
//   valid pixels to grad_x's NCHW rows.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/conv_input_grad_api.h"
#include "cpu/amx.h"
#include "cpu/bf16_split.h"
#include "cpu/transpose16.h"

namespace cbp {
namespace {

// alpha * aten::convolution_backward's input gradient in float32 (the path where AMX-BF16
// is not usable).
at::Tensor aten_input_grad(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, double alpha, bool weight_sign) {
  const auto stand_in = at::empty({grad_y.size(0), weight.size(1), input_size[0], input_size[1]}, grad_y.options());
  const auto w = weight_sign ? at::sign(weight) : weight;
  auto grad_x = std::get<0>(at::convolution_backward(grad_y, stand_in, w, std::nullopt, stride, padding, {1, 1},
                                                     false, {0, 0}, 1, {true, false, false}));
  return alpha == 1.0 ? grad_x : grad_x.mul_(alpha);
}

#if defined(__x86_64__) || defined(_M_X64)
#define CBP_AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,bmi2,amx-tile,amx-bf16")))

constexpr int64_t kRows = 32;        // pixels per block (2 A tiles)
constexpr int64_t kTileElems = 512;  // a tile of 16 rows x 32 bfloat16
// Window bytes of a work item (3 parts x O x pixels x 2 bytes, L2-resident while the item
// walks its phases and channel blocks).
constexpr int64_t kItemBytes = 512 * 1024;
// A block's epilogue runs inside the next block's K steps when that has at least this many.
// One thread, A/B in one process (min of 9; never / 8 / 4): 64@56 s1 16.5 / 14.3 / 14.2 ms,
// 128@28 16.2 / 14.8 / 15.3, s2 3x3 12.0 / 10.5 / 9.9, 1x1 s2 (4 steps) 7.9 / 7.1 / 9.2,
// 256@14 and 512@7 alike.
constexpr int64_t kDeferSteps = 8;
constexpr int64_t kParts = 3;  // bfloat16 parts of a float32 (8 + 8 + 8 significant bits)

// The pairs (grad_y part i, weight part j), 0-based, that a K step sums: i + j <= 2 (i + j <= 4
// counted from 1, see the header), i < a_parts, j < w_parts (each 1 or 3), in an order where
// consecutive pairs share an operand, so that each pair after the first loads one operand's
// 2 tiles (3 x 3 parts: 7 loads of 2 tiles instead of 9; one thread, one process, min of 7,
// loaded machine, float weights, 3x3 s1, N = 32: 512@7 36.4 -> 35.3 ms, 256@14 29.2 -> 28.0,
// 128@28 27.7 -> 25.7, 64@56 27.5 -> 27.4; 1 x 3 parts: 4 loads instead of 6).
struct PairWalk {
  int64_t n;
  int64_t i[6], j[6];
};
inline const PairWalk& pair_walk(int64_t a_parts, int64_t w_parts) {
  static constexpr PairWalk one{1, {0}, {0}}, a3{3, {0, 1, 2}, {0, 0, 0}}, w3{3, {0, 0, 0}, {0, 1, 2}},
      both{6, {0, 0, 1, 1, 2, 0}, {2, 1, 1, 0, 0, 0}};
  return a_parts == 1 ? (w_parts == 1 ? one : w3) : (w_parts == 1 ? a3 : both);
}

// One dimension's phases: input index x0[a] + i*s (i < cnt[a]) reads the taps a + m*s at
// output index i + q[a] - m. The grid: `size` positions per row (image), the Y outputs first,
// then zeros, enough for both sides: a read before 0 lands in the previous row's (image's)
// zeros, a read past Y in this one's (one zero column between 7-pixel rows, not two: 64 grid
// pixels per 7 x 7 image instead of 81).
struct Dim {
  std::vector<int64_t> x0, cnt, q, taps;  // taps[a]: how many
  int64_t size = 0;
  Dim(int64_t X, int64_t Y, int64_t K, int64_t s, int64_t p) {
    int64_t before = 0, reach = Y;  // the most positions read before 0, the end of the reads
    for (int64_t a = 0; a < s; ++a) {
      const int64_t first = ((a - p) % s + s) % s;
      x0.push_back(first);
      cnt.push_back(first < X ? (X - first + s - 1) / s : 0);
      q.push_back((first + p - a) / s);
      taps.push_back(a < K ? (K - a + s - 1) / s : 0);
      if (cnt[a] > 0 && taps[a] > 0) {
        before = std::max(before, taps[a] - 1 - q[a]);
        reach = std::max(reach, cnt[a] + q[a]);
      }
    }
    size = std::max(Y + before, reach);
  }
};

struct Phase {
  int64_t a, b, k0, k1, span;  // K steps [k0, k1); virtual rows [0, span) hold its valid pixels
};

struct AmxInputGrad {
  int64_t N, O, OH, OW, C, H, W, KH, KW, sh, sw;
  Dim dh, dw;
  int64_t Oq, P, Cp, Hp, Wp, grid, K = 0, minoff = 0, maxoff = 0, blocks = 0, per_item = 1, items = 0, L = 0;
  std::vector<Phase> phases;
  std::vector<int64_t> koff, kq;  // per K step: the tap's pixel offset, its first o-pair
  std::vector<int64_t> ktap;      // per K step: kh * KW + kw
  bool zero_fill = false;          // some input pixels read no tap (their gradient is 0)

  // The weight as the kernel reads it, w'[o, c, tap] = w[o * wo + c * wc + tap'] with tap' = tap,
  // or taps - 1 - tap where `flipped` (the forward: w' = the weight [C, O, KH, KW] transposed
  // and flipped in both spatial dims, read in place).
  int64_t wo, wc;
  bool flipped;
  bool weight_sign = false;  // the tiles hold sign(w') (conv_input_grad's weight_sign)

  AmxInputGrad(const at::Tensor& g, const at::Tensor& w, at::IntArrayRef in, at::IntArrayRef s, at::IntArrayRef p,
               bool forward = false, bool sign = false)
      : N(g.size(0)), O(g.size(1)), OH(g.size(2)), OW(g.size(3)), C(w.size(forward ? 0 : 1)), H(in[0]), W(in[1]),
        KH(w.size(2)), KW(w.size(3)), sh(s[0]), sw(s[1]), dh(H, OH, KH, sh, p[0]), dw(W, OW, KW, sw, p[1]),
        wo(forward ? KH * KW : C * KH * KW), wc(forward ? O * KH * KW : KH * KW), flipped(forward),
        weight_sign(sign) {
    Oq = (O + 31) / 32 * 16;  // o-pairs, O padded to whole K steps of 32
    // Window pitch per pixel: an odd number of 64-byte lines, so that a tile's rows and the
    // taps' neighbouring rows spread over all L1 sets. One thread, A/B in one process (min of
    // 5), pitch 2 Oq / + 1 line / + 2 lines: 512@7 21.5 / 16.1 / 16.4 ms (1 KiB apart: 4 sets,
    // the A loads stalled), 256@14 12.5 / 11.3 / 12.4, 64@56 16.7 / 16.0 / 18.1.
    P = Oq / 16 % 2 == 1 ? 2 * Oq : 2 * Oq + 32;
    Cp = (C + 31) / 32 * 32;
    Hp = dh.size;
    Wp = dw.size;
    grid = Hp * Wp;
    int64_t span = 0;
    for (int64_t a = 0; a < sh; ++a)
      for (int64_t b = 0; b < sw; ++b) {
        if (dh.cnt[a] == 0 || dw.cnt[b] == 0) continue;
        if (dh.taps[a] == 0 || dw.taps[b] == 0) {
          zero_fill = true;
          continue;
        }
        Phase ph{a, b, K, 0, (N - 1) * grid + (dh.cnt[a] - 1) * Wp + dw.cnt[b]};
        // K steps: the taps within each 32 channels, so that the steps of one tap row read
        // overlapping window lines (L1 hits: 9 taps x 1 KiB per part, within 3 x 34 pixels)
        for (int64_t oq = 0; oq < Oq; oq += 16)
          for (int64_t mh = 0; mh < dh.taps[a]; ++mh)
            for (int64_t mw = 0; mw < dw.taps[b]; ++mw, ++K) {
              const int64_t off = (dh.q[a] - mh) * Wp + dw.q[b] - mw;
              minoff = std::min(minoff, off);
              maxoff = std::max(maxoff, off);
              koff.push_back(off);
              kq.push_back(oq);
              ktap.push_back((a + mh * sh) * KW + b + mw * sw);
            }
        ph.k1 = K;
        phases.push_back(ph);
        span = std::max(span, ph.span);
      }
    blocks = (span + kRows - 1) / kRows;
    const int64_t threads = omp_get_max_threads();
    const int64_t fit = (kItemBytes / (3 * P * 2) - (maxoff - minoff)) / kRows;
    per_item = std::max<int64_t>(1, std::min(fit, (blocks + threads - 1) / threads));
    items = (blocks + per_item - 1) / per_item;
    L = per_item * kRows + maxoff - minoff;  // window pixels: an item's blocks plus the taps' reach
  }

  // sign(v) of 16 float32s as bits, torch.sign's values: +-1.0f, +0.0f for +-0 and NaN.
  CBP_AMX_BF16 static __m512i sign_bits(__m512i v) {
    const __m512i magnitude = _mm512_and_si512(v, _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 number = _mm512_test_epi32_mask(magnitude, magnitude) &
                             _mm512_cmple_epu32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
    const __m512i unit = _mm512_or_si512(_mm512_andnot_si512(magnitude, v), _mm512_set1_epi32(0x3F800000));
    return _mm512_maskz_mov_epi32(number, unit);
  }

  // The B tiles of the weight's parts: bt[((cb * kParts + j) * K + k) * 512 + r * 32 + 2 c + e]
  // = part j (next_bf16_part) of w'[2 (kq[k] + r) + e][16 cb + c] at tap ktap[k], 0 past O / C;
  // per o a gather of 16 c (576 consecutive bytes for 3 x 3), once. Returns whether every weight
  // that reaches an output is exact in bfloat16 (the low halves all 0; a tap no input pixel
  // reads, e.g. stride > H, is not): then only part 1 is written (the one the steps read), else
  // parts 2 and 3 too (those of exact tiles zeroed after the loop). One pass instead of part 1
  // then all three parts again: one thread, 512 -> 512 3 x 3 float weights, N = 1 at 7 x 7
  // (almost all preparation), min of 9, loaded machine: 6.26 -> 3.56 ms (levels 3.14 -> 2.3).
  // weight_sign: each gathered value replaced by its sign (sign_bits), exact in bfloat16.
  CBP_AMX_BF16 bool prepare_weights(const float* w, uint16_t* bt) const {
    const int64_t taps = KH * KW;
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(wc)));
    int low = 0;
    std::vector<uint8_t> split(Cp / 16 * K, 0);  // per tile: parts 2 and 3 written
#pragma omp parallel for collapse(2) schedule(static) reduction(| : low)
    for (int64_t cb = 0; cb < Cp / 16; ++cb)
      for (int64_t k = 0; k < K; ++k) {
        uint16_t* dst = bt + (cb * kParts * K + k) * kTileElems;
        const int64_t c0 = cb * 16, left = std::min<int64_t>(16, C - c0);
        const __mmask16 m = left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u);
        __m512i lows = _mm512_setzero_si512();
        __m512 rest[2][16];  // what part 1 leaves of each row's even / odd o
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t o = 2 * (kq[k] + r);
          const float* src = w + std::min(o, O - 1) * wo + std::min(c0, C - 1) * wc + (flipped ? taps - 1 - ktap[k] : ktap[k]);
          __m512i even = o < O ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lane, src, 4)
                               : _mm512_setzero_si512();
          __m512i odd = o + 1 < O ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lane, src + wo, 4)
                                  : _mm512_setzero_si512();
          if (weight_sign) {
            even = sign_bits(even);
            odd = sign_bits(odd);
          }
          lows = _mm512_or_si512(lows, _mm512_or_si512(even, odd));
          rest[0][r] = _mm512_castsi512_ps(even);
          rest[1][r] = _mm512_castsi512_ps(odd);
          _mm512_storeu_si512(dst + r * 32, _mm512_or_si512(_mm512_slli_epi32(next_bf16_part(rest[1][r]), 16),
                                                             next_bf16_part(rest[0][r])));
        }
        if (_mm512_test_epi32_mask(lows, _mm512_set1_epi32(0xFFFF)) == 0) continue;
        low = 1;
        split[cb * K + k] = 1;
        for (int64_t j = 1; j < kParts; ++j)
          for (int64_t r = 0; r < 16; ++r)
            _mm512_storeu_si512(dst + j * K * kTileElems + r * 32,
                                _mm512_or_si512(_mm512_slli_epi32(next_bf16_part(rest[1][r]), 16), next_bf16_part(rest[0][r])));
      }
    if (low != 0) {
#pragma omp parallel for collapse(2) schedule(static)
      for (int64_t cb = 0; cb < Cp / 16; ++cb)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 1; j < kParts && !split[cb * K + k]; ++j)
            std::memset(bt + ((cb * kParts + j) * K + k) * kTileElems, 0, kTileElems * 2);
    }
    return low == 0;
  }

  // The window of grid pixels [lo, lo + L): win[(part * L + r) * P + o] = that part of
  // grad_y channel o at pixel lo + r (0 at padding, past the last image and past O). Per
  // segment of a grid row inside the image: 16 channels x 16 pixels loaded, transposed, split.
  // Returns the grad_y parts the window needs: 1 where every value is exact in bfloat16 (parts 2
  // and 3 all 0), else 3.
  CBP_AMX_BF16 int64_t fill_window(const float* g, int64_t lo, uint16_t* win) const {
    const int64_t Op = 2 * Oq, part_stride = L * P;
    __m512i tails = _mm512_setzero_si512();  // what part 1 leaves, OR-ed
    for (int64_t r = lo; r < lo + L;) {
      if (r < 0) {  // before the first image: zeros
        const int64_t end = std::min<int64_t>(0, lo + L);
        for (int64_t part = 0; part < 3; ++part) std::memset(win + part * part_stride + (r - lo) * P, 0, (end - r) * P * 2);
        r = end;
        continue;
      }
      const int64_t n = r / grid, y = r % grid / Wp, x = r % Wp, x1 = std::min(Wp, x + lo + L - r);
      const bool row_in = n < N && y < OH;
      const int64_t xb = row_in ? x : x1, xe = row_in ? std::clamp(OW, xb, x1) : x1;  // data: columns < OW
      uint16_t* row = win + (r - lo) * P;
      for (int64_t part = 0; part < 3; ++part) {
        std::memset(row + part * part_stride, 0, (xb - x) * P * 2);
        std::memset(row + part * part_stride + (xe - x) * P, 0, (x1 - xe) * P * 2);
      }
      for (int64_t o0 = 0; o0 < Op && xe > xb; o0 += 16) {
        const float* src = g + ((n * O + o0) * OH + y) * OW + xb;
        for (int64_t c = 0; c < xe - xb; c += 16) {
          const __mmask16 m = static_cast<__mmask16>(xe - xb - c >= 16 ? 0xFFFFu : (1u << (xe - xb - c)) - 1u);
          __m512 v[16];
          for (int64_t i = 0; i < 16; ++i)
            v[i] = o0 + i < O ? _mm512_maskz_loadu_ps(m, src + i * OH * OW + c) : _mm512_setzero_ps();
          transpose16(v);  // v[j]: the 16 channels of pixel xb + c + j
          uint16_t* dst = row + (xb - x + c) * P + o0;
          for (int64_t j = 0; j < std::min<int64_t>(16, xe - xb - c); ++j) {
            __m512 rest = v[j];
            for (int64_t part = 0; part < kParts; ++part) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + part * part_stride + j * P),
                                  _mm512_cvtepi32_epi16(next_bf16_part(rest)));
              if (part == 0) tails = _mm512_or_si512(tails, _mm512_castps_si512(rest));
            }
          }
        }
      }
      r += x1 - x;
    }
    return _mm512_test_epi32_mask(tails, _mm512_set1_epi32(0x7FFFFFFF)) == 0 ? 1 : kParts;  // -0 counts as 0
  }

  // grad_x[n, c0 + c, ih, iw] = alpha * acc[c][r] for the valid pixels r of the block from
  // virtual row u0 of phase ph: runs of consecutive pixels of one input row (stride sw).
  CBP_AMX_BF16 void store(const float* acc, int64_t u0, const Phase& ph, int64_t c0, float alpha, float* gx) const {
    const int64_t Hi = dh.cnt[ph.a], Wj = dw.cnt[ph.b], plane = H * W;
    const __m512 scale = _mm512_set1_ps(alpha);
    const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(sw)));
    const __m512i half0 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // lane 2t <- t
    const __m512i half1 = _mm512_add_epi32(half0, _mm512_set1_epi32(8));
    const int64_t width = std::min<int64_t>(32, C - c0);
    int64_t n = u0 / grid, i = u0 % grid / Wp, j = u0 % Wp;
    for (int64_t r = 0; r < kRows && n < N;) {
      const int64_t run = std::min(kRows - r, Wp - j);  // pixels to the end of this grid row
      if (i < Hi && j < Wj) {
        const int64_t len = std::min(run, Wj - j);
        float* dst = gx + (n * C + c0) * plane + (dh.x0[ph.a] + i * sh) * W + dw.x0[ph.b] + j * sw;
        for (int64_t c = 0; c < width; ++c, dst += plane) {
          for (int64_t l = 0; l < len; l += 16) {
            const __mmask16 m = static_cast<__mmask16>(len - l >= 16 ? 0xFFFFu : (1u << (len - l)) - 1u);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + c * kRows + r + l), scale);
            if (sw == 1) {
              _mm512_mask_storeu_ps(dst + l, m, v);
            } else if (sw == 2) {  // every other column: lanes t -> 2t, two masked stores
              _mm512_mask_storeu_ps(dst + 2 * l, static_cast<__mmask16>(_pdep_u32(m & 0xFFu, 0x5555u)),
                                    _mm512_permutexvar_ps(half0, v));
              _mm512_mask_storeu_ps(dst + 2 * l + 16, static_cast<__mmask16>(_pdep_u32(m >> 8, 0x5555u)),
                                    _mm512_permutexvar_ps(half1, v));
            } else {
              _mm512_mask_i32scatter_ps(dst + l * sw, m, step, v, 4);
            }
          }
        }
      }
      r += run;
      j += run;
      if (j == Wp) {
        j = 0;
        if (++i == Hp) i = 0, ++n;
      }
    }
  }

  // K steps [k0, k1) of the block from window pixel `first`: C tiles 0-3 += A (tiles 4-5,
  // 32 pixels of grad_y part i) . B (tiles 6-7, 32 channels of weight part j) over the pairs
  // of pair_walk, loading only the operand that changes.
  CBP_AMX_BF16 void steps(const uint16_t* win, int64_t first, const uint16_t* b0t, const uint16_t* b1t,
                          const PairWalk& walk, int64_t k0, int64_t k1) const {
    const int64_t pitch = P * 2, part_stride = L * P, b_part = K * kTileElems;
    for (int64_t k = k0; k < k1; ++k) {
      const uint16_t* a = win + (first + koff[k]) * P + 2 * kq[k];
      for (int64_t t = 0; t < walk.n; ++t) {
        const int64_t i = walk.i[t], j = walk.j[t];
        if (t == 0 || j != walk.j[t - 1]) {
          _tile_loadd(6, b0t + j * b_part + k * kTileElems, 64);
          _tile_loadd(7, b1t + j * b_part + k * kTileElems, 64);
        }
        if (t == 0 || i != walk.i[t - 1]) {
          _tile_loadd(4, a + i * part_stride, pitch);
          _tile_loadd(5, a + i * part_stride + 16 * P, pitch);
        }
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
    }
  }

  // A block's C tiles as stored ([pixel][c]), waiting for their epilogue.
  struct Pending {
    const float* tiles = nullptr;
    int64_t u0 = 0, c0 = 0;
    const Phase* ph = nullptr;
  };

  // The epilogue of a pending block: acc[c][pixel] = tiles[pixel][c] (16 x 16 at a time),
  // then store.
  CBP_AMX_BF16 void finish(const Pending& p, float alpha, float* gx) const {
    alignas(64) float acc[32 * kRows];
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t w = 0; w < 2; ++w) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(p.tiles + (16 * h + i) * 32 + 16 * w);
        transpose16(v);
        for (int i = 0; i < 16; ++i) _mm512_store_ps(acc + (16 * w + i) * kRows + 16 * h, v[i]);
      }
    store(acc, p.u0, *p.ph, p.c0, alpha, gx);
  }

  // grad_x from grad_y and the B tiles of w_parts weight parts (1: exact in bfloat16, or 3).
  CBP_AMX_BF16 void run(const float* g, const uint16_t* bt, int64_t w_parts, float alpha, float* gx) const {
#pragma omp parallel
    {
      amx_tile_config();
      const at::Tensor window = at::empty({kParts * L * P}, at::kShort);  // 64-byte aligned (c10's CPU allocator)
      uint16_t* win = reinterpret_cast<uint16_t*>(window.data_ptr<int16_t>());
      alignas(64) float tiles[kRows * 32];  // the last block's C tiles, pending until read
      Pending pending;
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b0 = it * per_item, b1 = std::min(blocks, b0 + per_item), lo = b0 * kRows + minoff;
        const PairWalk& walk = pair_walk(fill_window(g, lo, win), w_parts);
        // The phases innermost: a block's outputs of all phases (interleaved columns and rows of
        // grad_x) are written together, so each output line is fetched once
        for (int64_t cb = 0; cb < Cp / 32; ++cb) {
          const uint16_t* b0t = bt + 2 * cb * kParts * K * kTileElems;
          const uint16_t* b1t = b0t + kParts * K * kTileElems;
          for (int64_t b = b0; b < b1; ++b)
            for (const Phase& ph : phases) {
              if (b * kRows >= ph.span) continue;
              _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
              // the previous block's epilogue between the two halves of this one's K steps: the
              // tile unit works on the queued steps meanwhile (with fewer than kDeferSteps steps
              // the epilogue follows them)
              const bool defer = ph.k1 - ph.k0 >= kDeferSteps;
              const int64_t mid = defer ? ph.k0 + (ph.k1 - ph.k0) / 2 : ph.k1;
              steps(win, b * kRows - lo, b0t, b1t, walk, ph.k0, mid);
              if (pending.tiles) finish(pending, alpha, gx);
              steps(win, b * kRows - lo, b0t, b1t, walk, mid, ph.k1);
              _tile_stored(0, tiles, 128); _tile_stored(1, tiles + 16, 128);  // after finish read them
              _tile_stored(2, tiles + 16 * 32, 128); _tile_stored(3, tiles + 16 * 32 + 16, 128);
              pending = {tiles, b * kRows, cb * 32, &ph};
              if (!defer) {
                finish(pending, alpha, gx);
                pending = {};
              }
            }
        }
      }
      if (pending.tiles) finish(pending, alpha, gx);
      _tile_release();
    }
  }

  // The weight's B tiles, then grad_x [N, C, H, W] from grad_y (contiguous float32 both).
  CBP_AMX_BF16 at::Tensor compute(const at::Tensor& grad_y, const at::Tensor& weight, double alpha) const {
    const at::Tensor tiles = at::empty({Cp / 16 * kParts * K * kTileElems}, at::kShort);
    uint16_t* bt = reinterpret_cast<uint16_t*>(tiles.data_ptr<int16_t>());
    const int64_t w_parts = prepare_weights(weight.data_ptr<float>(), bt) ? 1 : kParts;
    auto grad_x = zero_fill ? at::zeros({N, C, H, W}, grad_y.options()) : at::empty({N, C, H, W}, grad_y.options());
    run(grad_y.data_ptr<float>(), bt, w_parts, static_cast<float>(alpha), grad_x.data_ptr<float>());
    return grad_x;
  }
};
#endif

}  // namespace

at::Tensor conv_input_grad_cpu(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, double alpha, bool weight_sign) {
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.is_contiguous() && grad_y.scalar_type() == at::kFloat,
              "conv_input_grad: grad_y must be a contiguous float32 [N, O, OH, OW] tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.size(0) == grad_y.size(1),
              "conv_input_grad: weight must be a contiguous float32 [O, C, KH, KW] tensor, O = grad_y.size(1)");
  TORCH_CHECK(input_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 &&
                  stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "conv_input_grad: input_size, stride and padding must be pairs (stride >= 1, padding >= 0)");
  TORCH_CHECK(grad_y.size(2) == (input_size[0] + 2 * padding[0] - weight.size(2)) / stride[0] + 1 &&
                  grad_y.size(3) == (input_size[1] + 2 * padding[1] - weight.size(3)) / stride[1] + 1,
              "conv_input_grad: grad_y's OH / OW do not follow from input_size, the kernel, stride and padding");
  const int64_t numel = grad_y.size(0) * weight.size(1) * input_size[0] * input_size[1];
#if defined(__x86_64__) || defined(_M_X64)
  if (numel > 0 && grad_y.numel() > 0 && amx_usable(/*int8=*/false))
    return AmxInputGrad(grad_y, weight, input_size, stride, padding, /*forward=*/false, weight_sign)
        .compute(grad_y, weight, alpha);
#endif
  return aten_input_grad(grad_y, weight, input_size, stride, padding, alpha, weight_sign);
}

at::Tensor conv2d_integer_input_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "conv2d_integer_input: x must be a contiguous float32 [N, C, H, W] tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.size(1) == x.size(1),
              "conv2d_integer_input: weight must be a contiguous float32 [O, C, KH, KW] tensor, C = x.size(1)");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[0] < weight.size(2) && padding[1] >= 0 &&
                  padding[1] < weight.size(3) && x.size(2) + 2 * padding[0] >= weight.size(2) &&
                  x.size(3) + 2 * padding[1] >= weight.size(3),
              "conv2d_integer_input: padding must be a pair, 0 <= p < the kernel, and the padded input hold it");
  const std::array<int64_t, 2> out{x.size(2) + 2 * padding[0] - weight.size(2) + 1,
                                   x.size(3) + 2 * padding[1] - weight.size(3) + 1};
#if defined(__x86_64__) || defined(_M_X64)
  // conv2d(x, w, padding p) = the input gradient of a conv with weight w' = w transposed and
  // flipped, read in place, output size `out`, stride 1 and padding K - 1 - p, x as grad_y
  if (x.numel() > 0 && weight.size(0) > 0 && amx_usable(/*int8=*/false)) {
    const std::array<int64_t, 2> pad{weight.size(2) - 1 - padding[0], weight.size(3) - 1 - padding[1]};
    return AmxInputGrad(x, weight, out, {1, 1}, pad, /*forward=*/true).compute(x, weight, 1.0);
  }
#endif
  return at::conv2d(x, weight, {}, 1, padding);
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, ConvInputGradOp, conv_input_grad_cpu);
  CBP_IMPL(m, Conv2dIntegerInputOp, conv2d_integer_input_cpu);
}

}  // namespace cbp
