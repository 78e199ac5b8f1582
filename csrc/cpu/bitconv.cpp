// Bit-packed popcount convolution on the CPU (binary and ternary weights on {0,1} spikes).
// Equation (csrc/common/bitconv_math.h): per output (n, oh, ow, o), an integer count over
// the in-bounds taps and the channel words of the group,
//   binary c = sum 2*popc(x & w) - popc(x),  ternary c = sum popc(x & p) - popc(x & n),
// then out = float(c) * scale + bias[o] (float32, two roundings), output NHWC float32.
//
// Three paths, chosen at run time:
// - AMX-INT8 (when the CPU has it, Linux grants the tile state and cpu/isa.h allows it,
//   not with CBP_KERNELS_NO_AMX=1): the same counts as an int8 matrix product, spikes unpacked to bytes {0, 1} and
//   weights to {-1, 0, 1} (bitconv_amx.cpp);
// - AVX-512 VPOPCNTDQ (when the CPU has it and cpu/isa.h allows AVX-512):
//   vectorised over 16 output channels per 512-bit register. The weights are re-laid out
//   per call to [P][G][O-block of 16][K][16] (K = KH*KW*Wg words), so one K step loads one
//   register per 16 output channels and broadcasts one input word per pixel. A register
//   block of kPix output pixels x J (<= 4) blocks of 16 output channels keeps kPix*J
//   accumulators (16 for binary, + 2J weight registers for ternary, inside the 32 zmm).
//   OpenMP runs over (n, output row, group, chunk of 4*16 output channels).
// - portable: the same counts with __builtin_popcount, one output at a time.
// Files: this one (the portable path, the choice of path, the ops), bitconv_avx512.cpp,
// bitconv_amx.cpp, and bitconv_paths.h between them.
#include "common/bitconv_api.h"
#include "cpu/bitconv_paths.h"

namespace cbp {
namespace bitconv_cpu {
namespace {

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

}  // namespace
}  // namespace bitconv_cpu

std::tuple<at::Tensor, at::Tensor> bitconv2d_lif_cpu(const at::Tensor& x, const at::Tensor& planes,
                                                     const at::Tensor& mul, const at::Tensor& add,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, int64_t groups, int64_t T, double decay,
                                                     double v_threshold, double v_reset, bool soft_reset, int64_t kind,
                                                     bool decay_input) {
  using namespace bitconv_cpu;
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

at::Tensor bitconv2d_cpu(const at::Tensor& x, const at::Tensor& planes, double scale,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  using namespace bitconv_cpu;
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

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, Bitconv2dOp, bitconv2d_cpu);
  CBP_IMPL(m, Bitconv2dLifOp, bitconv2d_lif_cpu);
}

}  // namespace cbp
