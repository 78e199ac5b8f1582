// Integer math of the bit-packed popcount convolution, shared by the CPU (C++) and CUDA
// kernels. Plain C++ with no torch or CUDA runtime includes, so NVRTC (the CuPy backend)
// compiles it too.
//
// Format (cbp_kernels/ops/bitpack, cbp_kernels/ops/bitconv/weight.py):
//   spikes  x [N, H, W, G*Wg] 32-bit words, channel c of group g is bit (c % 32) of word
//           g*Wg + c/32 (least significant bit first), unused tail bits are 0;
//   weights planes [P, O, KH, KW, Wg]: P = 1 binary (bit 1 = +1, bit 0 = -1),
//           P = 2 ternary (plane 0: +1 mask, plane 1: -1 mask).
// Integer count of one output (o, oh, ow), over the taps (kh, kw) whose input pixel
//   ih = oh*stride_h - pad_h + kh*dil_h, iw = ow*stride_w - pad_w + kw*dil_w lies inside
// (padding is zero bits, so taps outside contribute nothing), and the Wg words w of the tap:
//   binary   c = sum 2*popc(x & w) - popc(x)      (= sum over channels of x * (+-1))
//   ternary  c = sum popc(x & p) - popc(x & n)    (= sum over channels of x * {-1, 0, 1})
// Output: out = float(c) * scale (+ bias[o]), two float32 roundings, the same as the
// reference F.conv2d on the integer levels followed by the scale (ops/bitconv/reference.py).
#pragma once

#if defined(__CUDACC_RTC__)  // NVRTC has no C library headers
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#include "common/hd.h"

namespace cbp {

struct BitConvGeometry {
  int64_t N, H, W, OH, OW;
  int64_t KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, words_per_group, out_per_group;  // Wg, Og
  int64_t planes;                                  // 1 binary, 2 ternary
};

// Output size of one spatial dimension (PyTorch's conv rule).
CBP_HD int64_t bitconv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

CBP_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// The integer counts c[j] of outputs (n, oh, ow, o0 + j), j < width <= J (the equation at the
// top of this file); the channels o0 .. o0 + width - 1 lie in one group. Each input word is
// loaded once and ANDed with the J channels' weight words. planes: [P, O, K] words.
template <int J>
CBP_HD void bitconv_count_block(const uint32_t* x, const uint32_t* planes, const BitConvGeometry& g, int64_t n,
                                int64_t oh, int64_t ow, int64_t o0, int width, int32_t (&c)[J]) {
  const int64_t O = g.groups * g.out_per_group, Wg = g.words_per_group, K = g.KH * g.KW * Wg;
  const int64_t grp = o0 / g.out_per_group;
  const bool ternary = g.planes == 2;
  CBP_UNROLL
  for (int j = 0; j < J; ++j) c[j] = 0;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
      if (iw < 0 || iw >= g.W) continue;
      const uint32_t* xp = x + ((n * g.H + ih) * g.W + iw) * (g.groups * Wg) + grp * Wg;
      const uint32_t* wk = planes + o0 * K + (kh * g.KW + kw) * Wg;  // channel o0's words of this tap
      for (int64_t w = 0; w < Wg; ++w) {
        const uint32_t xw = xp[w];
        const int32_t xc = ternary ? 0 : popcount32(xw);
        CBP_UNROLL
        for (int j = 0; j < J; ++j) {
          if (j >= width) break;
          const uint32_t* wj = wk + j * K + w;
          c[j] += ternary ? popcount32(xw & wj[0]) - popcount32(xw & wj[O * K]) : 2 * popcount32(xw & wj[0]) - xc;
        }
      }
    }
  }
}

// The integer count c of one output (n, oh, ow, o): the portable CPU path and the CUDA-core kernel.
CBP_HD int32_t bitconv_count(const uint32_t* x, const uint32_t* planes, const BitConvGeometry& g, int64_t n,
                             int64_t oh, int64_t ow, int64_t o) {
  int32_t c[1];
  bitconv_count_block<1>(x, planes, g, n, oh, ow, o, 1, c);
  return c[0];
}

// float(c) * scale + bias: the epilogue every backend applies (no FMA: two roundings).
CBP_HD float bitconv_epilogue(int32_t c, float scale, float bias) {
  const float scaled = static_cast<float>(c) * scale;
  return scaled + bias;
}

}  // namespace cbp
