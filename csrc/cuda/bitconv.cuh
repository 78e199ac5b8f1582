// CUDA kernels of the bit-packed popcount convolution (bit packing: csrc/cuda/bitpack.cuh). extern "C" kernels
// with no torch includes: csrc/cuda/bitconv.cu launches them from the extension, and the
// CuPy backend (cbp_kernels/ops/bitconv/cupy.py) JIT-compiles this same file with NVRTC.
// Formats and equations: csrc/common/bitconv_math.h (the fused epilogue's neuron:
// csrc/common/neuron_math.h); compile with --fmad=false (no FMA), as the reference rounds.
#pragma once

#include "common/bitconv_math.h"
#include "common/neuron_math.h"

namespace cbp {

// Word of channel-bit k of output pixel `pix` (NHWC, taps flattened as k = tap * Wg + w):
// 0 when k is past K or the tap reads padding.
__device__ __forceinline__ uint32_t bitconv_x_word(const uint32_t* x, const BitConvGeometry& g, int64_t n,
                                                   int64_t oh, int64_t ow, int64_t grp, int64_t k) {
  const int64_t Wg = g.words_per_group;
  if (k >= g.KH * g.KW * Wg) return 0u;
  const int64_t tap = k / Wg, w = k - tap * Wg;
  const int64_t ih = oh * g.stride_h - g.pad_h + (tap / g.KW) * g.dil_h;
  const int64_t iw = ow * g.stride_w - g.pad_w + (tap % g.KW) * g.dil_w;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0u;
  return x[((n * g.H + ih) * g.W + iw) * (g.groups * Wg) + grp * Wg + w];
}

}  // namespace cbp

// CUDA-core path: one thread per output (pixel, o), o fastest (a warp shares the pixel's
// input words); c = sum over taps/words of 2*popc(x & w) - popc(x) (binary) or
// popc(x & p) - popc(x & n) (ternary), out = float(c) * scale + bias[o].
// planes: [P, O, K] words (K = KH*KW*Wg); bias may be null.
extern "C" __global__ void bitconv_popc_kernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ planes,
                                               const float* __restrict__ bias, float scale, float* __restrict__ out,
                                               cbp::BitConvGeometry g) {
  const int64_t O = g.groups * g.out_per_group;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= g.N * g.OH * g.OW * O) return;
  const int64_t o = i % O, pix = i / O;
  const int64_t ow = pix % g.OW, oh = (pix / g.OW) % g.OH, n = pix / (g.OW * g.OH);
  const int32_t c = cbp::bitconv_count(x, planes, g, n, oh, ow, o);
  out[i] = cbp::bitconv_epilogue(c, scale, bias ? bias[o] : 0.0f);
}

namespace cbp {

#if !defined(CBP_HOST_EMULATION)  // the host emulation (csrc/emu/cuda_emu.h) follows the PTX fragment tables
// d += A x B with AND+POPC products: mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc,
// one warp (every lane calls it), the fragments of the layout described at bitconv_mma_kernel.
__device__ __forceinline__ void mma_b1_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

// The B fragment of plane `plane` for channel row `row` (0 past Og) at K step k0: words k0 + t, k0 + t + 4.
__device__ __forceinline__ void bitconv_mma_b(const uint32_t* __restrict__ planes, int64_t plane_stride, int plane,
                                              int64_t row, bool ovalid, int64_t K, int64_t k0, int tig,
                                              uint32_t (&b)[2]) {
  const uint32_t* wr = planes + plane * plane_stride + row;
  b[0] = (ovalid && k0 + tig < K) ? wr[k0 + tig] : 0u;
  b[1] = (ovalid && k0 + tig + 4 < K) ? wr[k0 + tig + 4] : 0u;
}

}  // namespace cbp

// Tensor-core path (sm_80+): implicit GEMM with mma.sync.m16n8k256 .b1 AND+POPC, D += popc(A & B):
// M = output pixels, N = output channels of a group, K = the flattened (tap, word) bits.
// A warp computes 16 pixels x (8 * kMmaNTiles) channels; per K step of 8 words each lane
// loads, following the PTX fragment layout of m16n8k256 .b1 (groupID g = lane / 4, t = lane % 4):
//   a0 = X[pixel g][word t], a1 = X[pixel g+8][word t], a2 = X[g][t+4], a3 = X[g+8][t+4];
//   b0 = Wt[channel g][word t], b1 = Wt[channel g][word t+4];
//   d0, d1 = D[pixel g][channels 2t, 2t+1], d2, d3 = D[pixel g+8][channels 2t, 2t+1].
// Binary also sums popc(x) of each pixel's words (over its 4 lanes, by shuffles).
// Every loop over tiles, halves and registers is unrolled, so the accumulators dp / dn stay in
// registers (no stack frame, no spill: tests/test_cuda_emu.py checks ptxas -v for sm_80 / sm_90).
// Grid: x = pixel tiles of 16 * warps per block, y = groups * channel tiles; block = 32 * warps.
#define CBP_MMA_NTILES 4
extern "C" __global__ void bitconv_mma_kernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ planes,
                                              const float* __restrict__ bias, float scale, float* __restrict__ out,
                                              cbp::BitConvGeometry g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int gid = lane / 4, tig = lane % 4;
  const int64_t O = g.groups * g.out_per_group, Og = g.out_per_group;
  const int64_t tiles_per_group = (Og + 8 * CBP_MMA_NTILES - 1) / (8 * CBP_MMA_NTILES);
  const int64_t grp = blockIdx.y / tiles_per_group;
  const int64_t o0 = (blockIdx.y % tiles_per_group) * 8 * CBP_MMA_NTILES;  // within the group
  const int64_t P = g.N * g.OH * g.OW;
  const int64_t pix0 = (static_cast<int64_t>(blockIdx.x) * warps + warp) * 16;
  if (pix0 >= P) return;  // the whole warp: pix0 is the same in its lanes
  const int64_t K = g.KH * g.KW * g.words_per_group;
  const bool ternary = g.planes == 2;
  // The two pixels this lane loads A words for.
  int64_t pn[2], poh[2], pow_[2];
  bool pvalid[2];
  CBP_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int64_t pix = pix0 + gid + 8 * h;
    pvalid[h] = pix < P;
    const int64_t pc = pvalid[h] ? pix : 0;
    pow_[h] = pc % g.OW;
    poh[h] = (pc / g.OW) % g.OH;
    pn[h] = pc / (g.OW * g.OH);
  }
  int32_t dp[CBP_MMA_NTILES][4] = {}, dn[CBP_MMA_NTILES][4] = {};
  int32_t xcount[2] = {0, 0};
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    uint32_t a[4];
    CBP_UNROLL
    for (int h = 0; h < 2; ++h) {
      a[h] = pvalid[h] ? cbp::bitconv_x_word(x, g, pn[h], poh[h], pow_[h], grp, k0 + tig) : 0u;
      a[h + 2] = pvalid[h] ? cbp::bitconv_x_word(x, g, pn[h], poh[h], pow_[h], grp, k0 + tig + 4) : 0u;
      xcount[h] += __popc(a[h]) + __popc(a[h + 2]);
    }
    CBP_UNROLL
    for (int nt = 0; nt < CBP_MMA_NTILES; ++nt) {
      const int64_t ol = o0 + nt * 8 + gid;
      const bool ovalid = ol < Og;
      const int64_t row = (grp * Og + (ovalid ? ol : 0)) * K;
      uint32_t b[2];
      cbp::bitconv_mma_b(planes, O * K, 0, row, ovalid, K, k0, tig, b);
      cbp::mma_b1_and_popc(dp[nt], a, b);
      if (ternary) {  // the same in every lane
        cbp::bitconv_mma_b(planes, O * K, 1, row, ovalid, K, k0, tig, b);
        cbp::mma_b1_and_popc(dn[nt], a, b);
      }
    }
  }
  CBP_UNROLL
  for (int h = 0; h < 2; ++h) {  // popc(x) of the pixel: sum over the group's 4 lanes
    xcount[h] += __shfl_xor_sync(0xffffffffu, xcount[h], 1);
    xcount[h] += __shfl_xor_sync(0xffffffffu, xcount[h], 2);
  }
  CBP_UNROLL
  for (int nt = 0; nt < CBP_MMA_NTILES; ++nt) {
    CBP_UNROLL
    for (int r = 0; r < 4; ++r) {
      const int h = r / 2;
      const int64_t pix = pix0 + gid + 8 * h, ol = o0 + nt * 8 + 2 * tig + (r % 2);
      if (pix < P && ol < Og) {
        const int32_t c = ternary ? dp[nt][r] - dn[nt][r] : 2 * dp[nt][r] - xcount[h];
        const int64_t o = grp * Og + ol;
        out[pix * O + o] = cbp::bitconv_epilogue(c, scale, bias ? bias[o] : 0.0f);
      }
    }
  }
#endif
}

// Fused epilogue (packed_conv2d_lif): one thread owns one output spike word, i.e. one pixel
// q = (n, oh, ow) of the Nb = N / T samples and the 32 output channels o = 32 * wo + j of word
// wo (in one group: the op requires groups == 1 or O / groups % 32 == 0). It walks time inside,
// the membrane V[j] in registers from V_reset (0 for the soft reset): for t = 0..T-1, on image
// t * Nb + n (x's batch is t major),
//   c[j] = the integer count of bitconv_math.h (bitconv_count_block),
//   y = float(c) * mul[o] + add[o];  H = charge(V, y);  S = (H - V_th >= 0);  V = reset(H, S)
// (neuron_math.h, neuron_step), and writes spikes[t * Q + q][wo] = OR_j S_j << j (Q = Nb*OH*OW);
// v_last[q][o] = V after t = T - 1. No float activation is written. Threads run word major
// (i = wo * Q + q), so a warp's threads share every weight word they load.
// x: [T*Nb, H, W, G*Wg], planes: [P, O, K], mul / add: float [O], spikes: [T*Nb, OH, OW, Wo]
// (Wo = ceil(O / 32)), v_last: float [Nb, OH, OW, O]. Launch ceil(Wo * Q / blockDim) blocks.
#define CBP_LIF_WORD 32
extern "C" __global__ void bitconv_lif_kernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ planes,
                                              const float* __restrict__ mul, const float* __restrict__ add,
                                              cbp::BitConvGeometry g, int64_t T, float decay, float v_threshold,
                                              float v_reset, int kind, int soft_reset, int decay_input,
                                              uint32_t* __restrict__ spikes, float* __restrict__ v_last) {
  const int64_t O = g.groups * g.out_per_group, Wo = (O + CBP_LIF_WORD - 1) / CBP_LIF_WORD;
  const int64_t Nb = g.N / T, Q = Nb * g.OH * g.OW;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= Wo * Q) return;
  const int64_t wo = i / Q, q = i - wo * Q;
  const int64_t ow = q % g.OW, oh = (q / g.OW) % g.OH, n = q / (g.OW * g.OH);
  const int64_t o0 = wo * CBP_LIF_WORD;
  const int width = static_cast<int>(O - o0 < CBP_LIF_WORD ? O - o0 : CBP_LIF_WORD);
  const cbp::NeuronParams p = cbp::neuron_params(v_threshold, v_reset, kind, soft_reset, decay_input, 0, 0, 0.0f);
  float v[CBP_LIF_WORD];
  CBP_UNROLL
  for (int j = 0; j < CBP_LIF_WORD; ++j) v[j] = p.v_reset;
  for (int64_t t = 0; t < T; ++t) {
    int32_t c[CBP_LIF_WORD];
    cbp::bitconv_count_block<CBP_LIF_WORD>(x, planes, g, t * Nb + n, oh, ow, o0, width, c);
    uint32_t word = 0u;
    CBP_UNROLL
    for (int j = 0; j < CBP_LIF_WORD; ++j) {
      if (j >= width) break;
      const bool s = cbp::neuron_step(v[j], cbp::bitconv_epilogue(c[j], mul[o0 + j], add[o0 + j]), decay, p);
      word |= static_cast<uint32_t>(s) << j;
    }
    spikes[(t * Q + q) * Wo + wo] = word;
  }
  CBP_UNROLL
  for (int j = 0; j < CBP_LIF_WORD; ++j) {
    if (j >= width) break;
    v_last[q * O + o0 + j] = v[j];
  }
}
