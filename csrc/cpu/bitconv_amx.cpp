// The AMX-INT8 path of the CPU popcount convolution (the equation and the choice of path:
// bitconv.cpp).
#include "cpu/bitconv_paths.h"
#include "cpu/amx.h"

#ifdef CBP_HAVE_X86
namespace cbp {
namespace bitconv_cpu {

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
// tile state and cpu/isa.h allows AMX (CBP_KERNELS_NO_AMX=1 tests the AVX-512 path).
bool use_amx(const BitConvGeometry& g) {
  return g.N * g.OH * g.OW >= kAmxMinPixels && use_avx512() && amx_usable(/*int8=*/true);
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

// Tiles 0-3: the 2 x 2 blocks of counts; 4-5: A; 6-7: B (cpu/amx.h: all 16 rows x 64 bytes).
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

}  // namespace bitconv_cpu
}  // namespace cbp
#endif  // CBP_HAVE_X86
