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

#ifndef CBP_HD
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CBP_HD __host__ __device__ __forceinline__
#else
#define CBP_HD inline
#endif
#endif

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

// Portable population count of a 32-bit word (SWAR), for compilers without a builtin.
CBP_HD int popcount32_swar(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((v * 0x01010101u) >> 24);
}

// float(c) * scale + bias: the epilogue every backend applies (no FMA: two roundings).
CBP_HD float bitconv_epilogue(int32_t c, float scale, float bias) {
  const float scaled = static_cast<float>(c) * scale;
  return scaled + bias;
}

}  // namespace cbp
