// The weight gradient of a convolution whose input x holds integers exact in bfloat16 (spikes,
// SEW sums), on the AMX-BF16 tile unit; the op and its precondition:
// csrc/common/conv_weight_grad_api.h.
//
//   grad_w[o, c, kh, kw] = sum_{n, oh, ow} g[n, o, oh, ow] * x[n, c, oh*sh + kh - ph, ow*sw + kw - pw]
//
// Exactness. g (float32) is split into three bfloat16 parts by truncation (cpu/bf16_split.h),
//   g1 = trunc16(g), g2 = trunc16(g - g1), g3 = g - g1 - g2   (trunc16: bits & 0xFFFF0000),
// each subtraction exact; g1 holds g's leading 8 significant bits, g2 the next 8, g3 the last
// 8 (and is thus exact in bfloat16): g = g1 + g2 + g3 exactly for every finite g whose parts
// are normal. TDPBF16PS multiplies bfloat16 pairs exactly into float32 and accumulates in
// float32, so grad_w is the float32 sum of the exact products g * x in an unspecified order:
// as accurate as float32 oneDNN, not bitwise equal to it. Bounds: AMX reads bfloat16
// denormals as zero and flushes denormal results, so parts below 2^-126 are lost (|g| below
// ~2^-110 loses bits, below 2^-126 it counts as 0) and |grad_w| below 2^-126 reads 0; a
// non-finite g gives NaN where it reaches. x is truncated to bfloat16 (exact by precondition).
//
// Addressing without im2col (as the popcount conv's, csrc/cpu/bitconv_amx.cpp): x is split
// into its stride phases; phase (a, b) holds x pixel (i*sh + a - ph, j*sw + b - pw) at grid
// position u = i*Ws + j (Hs x Ws grid, zero where padding), and tap (kh, kw) reads phase
// (kh % sh, kw % sw) at u = v + off(tap), off = (kh / sh)*Ws + kw / sw, from output "virtual
// row" v = oh*Ws + ow. With the images' grids Q columns apart, k = n*Q + u (Q = Hs*Ws less the
// padding rows an image's bottom and the next one's top share), each tap is one matrix
// product over k:
//   grad_w[o, c, tap] = sum_k A[o][k - off(tap)] * B_phase(tap)[k][c],
//   A[o][n*Q + v] = g[n, o, oh, ow] (0 for ow >= OW, oh >= OH, and k < 0: a front margin),
//   B_phase[n*Q + u][c] = x's phase grid;
// the tap moves A's row start (any element offset loads as a tile), so B's k-pairs stay
// aligned (VNNI layout [k/2][C][2]); k - off never reads another image's values (an image's
// last off_max virtual rows are past its last output). g's three parts are three A operands
// summed into the same accumulators: one B tile load serves six TDPBF16PS.
//
// Work: items (32 output channels ob, 32 channels cb, tap), 2 x 2 tiles of 16 x 16 sums each,
// split in contiguous ranges between the threads. k runs in blocks of Kb columns (their B and
// an ob's A fit in L2); per block a thread builds the B of its channel blocks (phase rows to
// bfloat16, 16 x 16 transposes to VNNI), then per ob the three parts of A, then visits the
// ob's items 128 columns at a time (A and a cb's B stay in L1 across the taps). A visit loads
// its accumulators (zero on the first), runs its columns and stores them to its 4 KiB buffer;
// at the end the buffers are transposed to grad_w [O, C, KH, KW].
// GCC 12 reads the "undefined" pass-through operand of the unmasked AVX-512 intrinsics
// (unpack, cvtepi32_epi16, shuffle_i32x4) as maybe-uninitialized: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <omp.h>

#include "common/conv_weight_grad_api.h"
#include "cpu/amx.h"
#include "cpu/bf16_split.h"
#include "cpu/transpose16.h"

namespace cbp {
namespace {

struct Geometry {
  int64_t N, C, H, W, O, OH, OW, KH, KW, sh, sw, ph, pw;
};

#if defined(__x86_64__) || defined(_M_X64)
#define CBP_AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

// n uninitialised, 64-byte aligned values of scratch space number `Slot` of this thread, kept
// between calls (grown, never shrunk): a fresh large buffer is mapped anew on every call and
// page-faults on first touch (~5000 faults per call for layer4's accumulators and B, 3-5 ms).
template <typename T, int Slot>
T* scratch(int64_t n) {
  thread_local Buffer<char> buf;
  thread_local int64_t size = 0;
  const int64_t bytes = (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
  if (bytes > size) {
    buf.reset(static_cast<char*>(std::aligned_alloc(64, static_cast<size_t>(bytes))));
    size = bytes;
  }
  return reinterpret_cast<T*>(buf.get());
}

// Bytes of one k block's B (all channels, every phase read) plus one output-channel block's A
// (three parts of 32 rows), kept L2-resident (2 MiB per core here): 1 MiB measured best
// (batch-8 SEW-ResNet-18 layers, one thread, A/B in one process: 512 KiB within +-5%, 1.5 MiB
// 0-14% slower; 4 and 16 MiB gained 5-10% on layer4 but lost 20-35% on the stride-2 3x3 ones).
constexpr int64_t kBlockBytes = 1 << 20;
// Columns per visit of an item: an output-channel block's items (its channel blocks, taps)
// run over 128 columns of the block, then the next 128, so that A's rows and a channel
// block's B are read from L1 across the taps; the accumulators travel each time (4 KiB
// in, 4 KiB out). 128 vs the whole block: 5-15% faster on the 3x3 layers; 64, 96, 192, 256
// and 512 slower, and so were groups of 2-4 items run over the whole block per visit.
constexpr int64_t kSub = 128;

struct AmxWgrad {
  Geometry g;
  int64_t Hs, Ws, P, Q, Op, Cp, taps, Kpad, Kb, margin, a_pitch, nob, ncb, items, slots;
  std::vector<int64_t> tap_off, tap_slot;  // per tap: grid offset, B slot of its phase
  std::vector<int64_t> slot_phase;         // per B slot: the phase a * sw + b

  explicit AmxWgrad(const Geometry& geo) : g(geo) {
    Hs = (g.H + 2 * g.ph + g.sh - 1) / g.sh;
    Ws = (g.W + 2 * g.pw + g.sw - 1) / g.sw;
    P = Hs * Ws;
    Op = (g.O + 31) / 32 * 32;
    Cp = (g.C + 31) / 32 * 32;
    taps = g.KH * g.KW;
    std::vector<int64_t> slot_of(g.sh * g.sw, -1);
    int64_t off_max = 0;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t phase = (kh % g.sh) * g.sw + kw % g.sw;
        if (slot_of[phase] < 0) {
          slot_of[phase] = static_cast<int64_t>(slot_phase.size());
          slot_phase.push_back(phase);
        }
        tap_slot.push_back(slot_of[phase]);
        tap_off.push_back((kh / g.sh) * Ws + kw / g.sw);
        off_max = std::max(off_max, tap_off.back());
      }
    }
    slots = static_cast<int64_t>(slot_phase.size());
    // Images Q = P - overlap * Ws columns apart: the grid rows that are padding (zero) at the
    // bottom of an image and at the top of the next, in every phase read, are shared (3x3
    // stride 1 padding 1: one row; layer4's 7 x 7 images: 72 columns instead of 81).
    int64_t overlap = Hs;
    for (const int64_t phase : slot_phase) {
      const int64_t a = phase / g.sw;
      const int64_t top = g.ph > a ? (g.ph - a + g.sh - 1) / g.sh : 0;           // rows with ih < 0
      const int64_t bottom = Hs - (g.H + g.ph - a + g.sh - 1) / g.sh;             // rows with ih >= H
      overlap = std::min({overlap, top, std::max<int64_t>(bottom, 0)});
    }
    Q = P - overlap * Ws;
    Kpad = ((g.N - 1) * Q + P + 31) / 32 * 32;
    margin = off_max;
    const int64_t per_k = slots * Cp * 2 + 3 * 32 * 2;
    Kb = std::clamp<int64_t>(kBlockBytes / per_k / 32 * 32, 256, 16384);
    const int64_t blocks = (Kpad + Kb - 1) / Kb;
    Kb = ((Kpad + blocks - 1) / blocks + 31) / 32 * 32;  // blocks of one size (no short last block)
    a_pitch = (margin + Kb + 31) / 32 * 32;  // elements: whole 64-byte lines, an odd number of them
    if ((a_pitch / 32) % 2 == 0) a_pitch += 32;
    nob = Op / 32;
    ncb = Cp / 32;
    items = nob * taps * ncb;
  }

  // A stretch of a block's columns along one grid row: `len` columns from column j of the
  // operand, the first `valid` of them (from `skip` on, for B) read from src on, the others 0.
  struct Run {
    int64_t j, len, skip, valid, src;
  };

  // A's runs for the block from k0 (columns j <-> k = k0 - margin + j, j < margin + len):
  // src is g's offset less o * OH * OW.
  std::vector<Run> a_runs(int64_t k0, int64_t len) const {
    std::vector<Run> runs;
    const int64_t kbeg = k0 - margin, kend = k0 + len;
    for (int64_t k = kbeg; k < kend;) {
      int64_t end = kend, valid = 0, src = 0;
      if (k < 0) {
        end = std::min<int64_t>(0, kend);
      } else if (k < g.N * Q) {
        const int64_t n = k / Q, v = k % Q, oh = v / Ws, ow = v % Ws;
        end = std::min(kend, oh >= g.OH ? (n + 1) * Q : k + Ws - ow);  // this grid row, or the image's rest
        valid = oh >= g.OH ? 0 : std::clamp<int64_t>(g.OW - ow, 0, end - k);
        src = (n * g.O * g.OH + oh) * g.OW + ow;
      }
      runs.push_back({k - kbeg, end - k, 0, valid, src});
      k = end;
    }
    return runs;
  }

  // B's runs of phase `phase` for the block from k0 (columns j <-> k = k0 + j, j < len): src is
  // x's offset less c * H * W, read at stride sw.
  std::vector<Run> b_runs(int64_t phase, int64_t k0, int64_t len) const {
    std::vector<Run> runs;
    const int64_t a = phase / g.sw, b = phase % g.sw;
    // grid columns j whose x column j * sw + b - pw lies in [0, W)
    const int64_t jlo = g.pw > b ? (g.pw - b + g.sw - 1) / g.sw : 0, jhi = (g.W + g.pw - b + g.sw - 1) / g.sw;
    for (int64_t k = k0; k < k0 + len;) {
      const int64_t n = k / Q, u = k % Q, i = u / Ws, j = u % Ws, ih = i * g.sh + a - g.ph;
      const int64_t end = std::min(k0 + len, k + Ws - j);
      if (n < g.N && ih >= 0 && ih < g.H) {
        const int64_t jb = std::clamp(jlo, j, j + end - k), je = std::clamp(jhi, jb, j + end - k);
        if (je > jb) runs.push_back({k - k0, end - k, jb - j, je - jb, (n * g.C * g.H + ih) * g.W + jb * g.sw + b - g.pw});
      }
      k = end;
    }
    return runs;
  }

  // Prefetches n floats from p into L1. The operands are built row by row (32 rows of g, 16
  // of x) from as many streams; fetching the next row's run while converting this one: 3-10%
  // faster per layer, one thread, A/B in one process (the 1 x 1 layer at 14 x 14: 10% slower).
  template <typename T>
  static void prefetch(const T* p, int64_t n) {
    for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p) + i, _MM_HINT_T0);
  }

  // dst[i] = the bfloat16 (truncated; exact by precondition) of src[i * stride], i < n.
  CBP_AMX_BF16 static void to_bf16(const float* src, int64_t stride, int64_t n, uint16_t* dst) {
    const __m512i high = _mm512_setr_epi32(0x30001, 0x70005, 0xB0009, 0xF000D, 0x130011, 0x170015, 0x1B0019, 0x1F001D,
                                           0x230021, 0x270025, 0x2B0029, 0x2F002D, 0x330031, 0x370035, 0x3B0039,
                                           0x3F003D);  // words 2i + 1: the high halves of 32 floats
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    int64_t i = 0;
    if (stride == 1) {
      for (; i < n; i += 32) {
        const int64_t m = std::min<int64_t>(32, n - i);
        const __mmask16 m0 = m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << m) - 1u);
        const __mmask16 m1 = m <= 16 ? 0 : static_cast<__mmask16>((uint32_t{1} << (m - 16)) - 1u);
        const __m512i v = _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi32(m0, src + i), high,
                                                    _mm512_maskz_loadu_epi32(m1, src + i + 16));
        _mm512_mask_storeu_epi16(dst + i, m == 32 ? ~__mmask32{0} : (__mmask32{1} << m) - 1u, v);
      }
    } else if (stride == 2) {
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i), count = 2 * m - 1;  // floats read
        const __mmask16 m0 = count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1u);
        const __mmask16 m1 = count <= 16 ? 0 : static_cast<__mmask16>((1u << (count - 16)) - 1u);
        const __m512i v = _mm512_permutex2var_epi32(_mm512_maskz_loadu_epi32(m0, src + 2 * i), even,
                                                    _mm512_maskz_loadu_epi32(m1, src + 2 * i + 16));
        _mm256_mask_storeu_epi16(dst + i, static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1u),
                                 _mm512_cvtepi32_epi16(_mm512_maskz_srli_epi32(0xFFFF, v, 16)));
      }
    } else {
      for (; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, src + i * stride, 4);
        dst[i] = static_cast<uint16_t>(bits >> 16);
      }
    }
  }

  // The same from bytes (integers 0..255, exact in bfloat16).
  CBP_AMX_BF16 static void store_bf16(uint16_t* dst, int64_t m, __m512i ints) {  // m of 16 int32 as bfloat16
    const __m512i bits = _mm512_castps_si512(_mm512_cvtepi32_ps(ints));
    _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1u),
                             _mm512_cvtepi32_epi16(_mm512_maskz_srli_epi32(0xFFFF, bits, 16)));
  }

  CBP_AMX_BF16 static void to_bf16(const uint8_t* src, int64_t stride, int64_t n, uint16_t* dst) {
    int64_t i = 0;
    if (stride == 1) {
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i);
        store_bf16(dst + i, m, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(m == 16 ? 0xFFFF : (1u << m) - 1u),
                                                              src + i)));
      }
    } else if (stride == 2) {
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i), count = 2 * m - 1;  // bytes read
        const __m256i raw = _mm256_maskz_loadu_epi8(count == 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1u,
                                                    src + 2 * i);
        // as 16 dwords of two words each, the low word is the even byte
        store_bf16(dst + i, m, _mm512_and_si512(_mm512_cvtepu8_epi16(raw), _mm512_set1_epi32(0xFFFF)));
      }
    } else {
      for (; i < n; ++i) {
        const float v = src[i * stride];
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        dst[i] = static_cast<uint16_t>(bits >> 16);
      }
    }
  }

  // out[r] (16 dwords) = column r of the 16 x 16 dword matrix in rows[0..16).
  CBP_AMX_BF16 static void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // r[4q + e]: rows 4q..4q+3's dwords e, e+4, e+8, e+12 in each 128-bit lane (lane l: dword 4l + e)
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);        // lanes 0, 2 of r[i]; 0, 2 of r[4+i]
      t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xDD);    // lanes 1, 3
      t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
      t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);       // column lanes 0 (rows 0-3, 4-7, 8-11, 12-15)
      r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);   // lane 2
      r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);  // lane 1
      r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);  // lane 3
    }
  }

  // B's channels c0 .. c0 + 16 of slot s for the block (len columns): b[(s * Kb/2 + pair) *
  // Cp * 2 + 2c + i] = bf16(x phase at k0 + 2 * pair + i, channel c). The 16 channels' rows
  // to `stage` (bfloat16, [16][len]: dword `pair` of a row is that pair), then 16 x 16 dword
  // blocks transposed into B.
  template <typename T>
  CBP_AMX_BF16 void build_b(const T* x, int64_t s, int64_t c0, int64_t len, const std::vector<Run>& runs,
                            uint16_t* stage, uint16_t* b) const {
    std::memset(stage, 0, 16 * len * 2);
    for (int64_t c = c0; c < std::min(c0 + 16, g.C); ++c) {
      uint16_t* row = stage + (c - c0) * len;
      for (const Run& r : runs) {
        if (c + 1 < g.C) prefetch(x + (c + 1) * g.H * g.W + r.src, r.valid * g.sw);  // the next channel's run
        to_bf16(x + c * g.H * g.W + r.src, g.sw, r.valid, row + r.j + r.skip);
      }
    }
    const uint32_t* st = reinterpret_cast<const uint32_t*>(stage);
    uint32_t* dst = reinterpret_cast<uint32_t*>(b) + s * (Kb / 2) * Cp + c0;
    for (int64_t p0 = 0; p0 < len / 2; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(st + i * (len / 2) + p0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (p0 + i) * Cp, r[i]);
    }
  }

  // The three parts of g's values src[0 .. valid) to three bfloat16 rows (stride `part`),
  // then zeros up to len.
  CBP_AMX_BF16 static void split_row(const float* src, int64_t valid, int64_t len, uint16_t* dst, int64_t part) {
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1u);
      const __mmask16 in = valid - i >= 16 ? 0xFFFF : valid <= i ? 0 : static_cast<__mmask16>((1u << (valid - i)) - 1u);
      __m512 rest = _mm512_maskz_loadu_ps(in, src + i);
      for (int64_t p = 0; p < 3; ++p)  // g1, g2, g3 (cpu/bf16_split.h)
        _mm256_mask_storeu_epi16(dst + p * part + i, m, _mm512_cvtepi32_epi16(next_bf16_part(rest)));
    }
  }

  // A of output channels 32*ob .. +32 for the block: a[(p * 32 + r) * a_pitch + j] = part p
  // of A[32*ob + r][k0 - margin + j], j < margin + len (runs: a_runs).
  CBP_AMX_BF16 void build_a(const float* gy, int64_t ob, const std::vector<Run>& runs, uint16_t* a) const {
    const int64_t part = 32 * a_pitch;
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t o = ob * 32 + r;
      uint16_t* row = a + r * a_pitch;
      if (o >= g.O) {
        for (int64_t p = 0; p < 3; ++p) std::memset(row + p * part, 0, 2 * a_pitch);
        continue;
      }
      const float* plane = gy + o * g.OH * g.OW;
      for (const Run& run : runs) {
        if (o + 1 < g.O) prefetch(plane + g.OH * g.OW + run.src, run.valid);  // the next row's run
        split_row(plane + run.src, run.valid, run.len, row + run.j, part);
      }
    }
  }

  // A visit of item (ob, tap, cb): columns [k0, k0 + len) of the block: its 32 x 32 sums (acc, rows
  // o, columns c) += the columns' products, g's 3 parts. Tiles 0-3: the 2 x 2 accumulators;
  // 4-5: A; 6-7: B. The item's first visit starts from zero.
  CBP_AMX_BF16 void item(int64_t tap, int64_t cb, int64_t k0, int64_t len, const uint16_t* a, const uint16_t* b,
                         float* acc, bool first) const {
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, acc, 128);
      _tile_loadd(1, acc + 16, 128);
      _tile_loadd(2, acc + 16 * 32, 128);
      _tile_loadd(3, acc + 16 * 32 + 16, 128);
    }
    const uint16_t* ar = a + margin - tap_off[tap];
    const uint16_t* br = b + tap_slot[tap] * (Kb / 2) * Cp * 2 + cb * 64;
    const int64_t as = a_pitch * 2, bs = Cp * 4, part = 32 * a_pitch;
    for (int64_t k = k0; k < k0 + len; k += 32) {
      const uint16_t* bk = br + (k / 2) * Cp * 2;
      _tile_loadd(6, bk, bs);
      _tile_loadd(7, bk + 32, bs);
      for (int64_t p = 0; p < 3; ++p) {
        const uint16_t* ak = ar + p * part + k;
        _tile_loadd(4, ak, as);
        _tile_loadd(5, ak + 16 * a_pitch, as);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
  }

  // grad_w's block of output channels 32 ob .. +32 and channels 32 cb .. +32 from its items'
  // sums (unit = ob * ncb + cb): out[o][c][tap] = acc[unit][tap][o % 32][c % 32], each output
  // row written in order (a scatter per item's row measured 3x slower: 3 ms of layer4's 28).
  // Up to 16 taps: per 16 channels of a row, the taps' 16 sums transposed in registers
  // (transpose16.h) into each channel's run of taps; 16 channels' runs (taps whole 64-byte
  // lines where the row is aligned: C % 16 == 0) are streamed past the caches (grad_w is read
  // next by the optimizer's passes, after the backward: no read for ownership), else written by
  // masked stores; the scalar loop for larger kernels. The 19 weight gradients of SEW-ResNet-18's
  // batch-1 CBP step, A/B in one process, min of 7, under load, scalar -> transposed: 51.2 ->
  // 50.2 ms (one thread), 27.3 -> 26.5 (two); with the streamed lines 48.8 -> 45.7, 25.5 ->
  // 23.4; at batch 8 323 -> 312 and 167 -> 168.
  CBP_AMX_BF16 void write_out(int64_t unit, const float* acc, float* out) const {
    const int64_t ob = unit / ncb, cb = unit % ncb;
    const int64_t rows = std::min<int64_t>(32, g.O - ob * 32), cols = std::min<int64_t>(32, g.C - cb * 32);
    const float* sums = acc + unit * taps * 1024;
    if (taps <= 16) {
      const __mmask16 run = static_cast<__mmask16>((1u << taps) - 1u);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = out + ((ob * 32 + r) * g.C + cb * 32) * taps;
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
          __m512 v[16];
          for (int64_t t = 0; t < 16; ++t)
            v[t] = t < taps ? _mm512_loadu_ps(sums + t * 1024 + r * 32 + c0) : _mm512_setzero_ps();
          cbp::transpose16(v);  // v[i]: channel c0 + i's taps
          float* dst = row + c0 * taps;
          if (cols - c0 >= 16 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
            alignas(64) float line[16 * 16];
            for (int64_t i = 0; i < 16; ++i) _mm512_mask_storeu_ps(line + i * taps, run, v[i]);
            for (int64_t j = 0; j < taps; ++j) _mm512_stream_ps(dst + 16 * j, _mm512_load_ps(line + 16 * j));
            continue;
          }
          for (int64_t i = 0; i < std::min<int64_t>(16, cols - c0); ++i)
            _mm512_mask_storeu_ps(row + (c0 + i) * taps, run, v[i]);
        }
      }
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* row = out + ((ob * 32 + r) * g.C + cb * 32) * taps;
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t t = 0; t < taps; ++t) row[c * taps + t] = sums[t * 1024 + r * 32 + c];
    }
  }

  // grad_w to out [O, C, KH, KW]; the items' sums in acc[ob][cb][tap][32][32].
  // Each thread runs its own range of items (ob, cb, tap) over all blocks, building the B it
  // reads (its channel blocks) itself: no barrier between blocks (threads waiting at one for a
  // descheduled peer on a busy machine took up to 10x longer), at the price of building B
  // once per thread.
  template <typename T>
  CBP_AMX_BF16 void run(const float* gy, const T* x, float* acc, float* out) const {
#pragma omp parallel
    {
      const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t lo = items * t / threads, hi = items * (t + 1) / threads, per_ob = ncb * taps;
      if (lo < hi) {
        amx_tile_config();
        uint16_t* a = scratch<uint16_t, 0>(3 * 32 * a_pitch);
        uint16_t* stage = scratch<uint16_t, 1>(16 * Kb);
        uint16_t* b = scratch<uint16_t, 2>(slots * (Kb / 2) * Cp * 2);
        // the channel blocks of this thread's items: all unless they lie in one output-channel block
        const bool one_ob = lo / per_ob == (hi - 1) / per_ob;
        const int64_t cb0 = one_ob ? lo % per_ob / taps : 0, cb1 = one_ob ? (hi - 1) % per_ob / taps + 1 : ncb;
        for (int64_t k0 = 0; k0 < Kpad; k0 += Kb) {
          const int64_t len = std::min(Kb, Kpad - k0);
          for (int64_t s = 0; s < slots; ++s) {
            const std::vector<Run> runs = b_runs(slot_phase[s], k0, len);
            for (int64_t c0 = cb0 * 32; c0 < cb1 * 32; c0 += 16) build_b(x, s, c0, len, runs, stage, b);
          }
          const std::vector<Run> arow = a_runs(k0, len);
          for (int64_t ob = lo / per_ob; ob * per_ob < hi; ++ob) {
            build_a(gy, ob, arow, a);
            const int64_t i0 = std::max(lo, ob * per_ob), i1 = std::min(hi, (ob + 1) * per_ob);
            for (int64_t ks = 0; ks < len; ks += kSub) {
              const bool first = k0 == 0 && ks == 0;
              for (int64_t it = i0; it < i1; ++it)
                item(it % taps, it / taps % ncb, ks, std::min(kSub, len - ks), a, b, acc + it * 1024, first);
            }
          }
        }
        _tile_release();
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t unit = 0; unit < nob * ncb; ++unit) write_out(unit, acc, out);
      _mm_sfence();  // the streamed lines of grad_w before the op returns
    }
  }
};

#endif

}  // namespace

at::Tensor conv_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.is_contiguous() && grad_y.scalar_type() == at::kFloat,
              "conv_weight_grad: grad_y must be a contiguous float32 [N, O, OH, OW] tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kByte),
              "conv_weight_grad: x must be a contiguous float32 or uint8 [N, C, H, W] tensor");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "conv_weight_grad: kernel_size, stride and padding take 2 values each");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), grad_y.size(1), grad_y.size(2), grad_y.size(3),
             kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(g.KH >= 1 && g.KW >= 1 && g.sh >= 1 && g.sw >= 1 && g.ph >= 0 && g.pw >= 0,
              "conv_weight_grad: needs kernel_size, stride >= 1 and padding >= 0");
  TORCH_CHECK(grad_y.size(0) == g.N && g.OH == (g.H + 2 * g.ph - g.KH) / g.sh + 1 && g.OW == (g.W + 2 * g.pw - g.KW) / g.sw + 1 &&
                  g.OH >= 1 && g.OW >= 1,
              "conv_weight_grad: grad_y's shape is not the convolution's output shape");
#if defined(__x86_64__) || defined(_M_X64)
  if (g.N * g.C * g.O > 0 && amx_usable(/*int8=*/false)) {
    const AmxWgrad conv(g);
    auto grad_w = at::empty({g.O, g.C, g.KH, g.KW}, grad_y.options());
    float* acc = scratch<float, 3>(conv.items * 32 * 32);
    if (x.scalar_type() == at::kByte) {
      conv.run(grad_y.data_ptr<float>(), x.data_ptr<uint8_t>(), acc, grad_w.data_ptr<float>());
    } else {
      conv.run(grad_y.data_ptr<float>(), x.data_ptr<float>(), acc, grad_w.data_ptr<float>());
    }
    return grad_w;
  }
#endif
  const auto w = at::empty({g.O, g.C, g.KH, g.KW}, grad_y.options());  // only its shape is read
  return std::get<1>(at::convolution_backward(grad_y, x.to(at::kFloat), w, std::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                              {false, true, false}));
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) { CBP_IMPL(m, ConvWeightGradOp, conv_weight_grad_cpu); }

}  // namespace cbp
