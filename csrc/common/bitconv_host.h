// Host-side checks and geometry of the bit-packed convolution's entry points, shared by the
// CPU (csrc/cpu/bitconv.cpp) and CUDA (csrc/cuda/bitconv.cu) launchers. Torch headers: not
// for NVRTC (the kernels' own header is common/bitconv_math.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/bitconv_math.h"
#include "common/neuron_math.h"

namespace cbp {

// Checks x int32 [N, H, W, G*Wg] and planes int32 [P, O, KH, KW, Wg] and fills the geometry.
inline BitConvGeometry bitconv_geometry(const at::Tensor& x, const at::Tensor& planes, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kInt && x.is_contiguous(),
              "bitconv2d: x must be contiguous int32 [N, H, W, Cw]");
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
  return g;
}

// Everything a launcher passes to the kernels: checked geometry, the allocated float32
// output [N, OH, OW, O] and raw pointers (bias null when absent).
struct BitConvCall {
  BitConvGeometry g;
  at::Tensor out, bias;
  const uint32_t* x;
  const uint32_t* planes;
  const float* bias_ptr;
  float* out_ptr;
};

inline BitConvCall bitconv_call(const at::Tensor& x, const at::Tensor& planes, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  BitConvCall c{bitconv_geometry(x, planes, stride, padding, dilation, groups)};
  const int64_t O = planes.size(1);
  c.out = at::empty({c.g.N, c.g.OH, c.g.OW, O}, x.options().dtype(at::kFloat));
  if (bias.has_value()) {
    c.bias = bias->contiguous();
    TORCH_CHECK(c.bias.scalar_type() == at::kFloat && c.bias.numel() == O, "bitconv2d: bias must be float32 [O]");
  }
  c.x = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  c.planes = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
  c.bias_ptr = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  c.out_ptr = c.out.data_ptr<float>();
  return c;
}

// Everything a launcher of bitconv2d_lif passes to its kernel: checked geometry (x's batch is
// T * Nb, t major), mul / add contiguous float32 [O], the zeroed spikes int32
// [T*Nb, OH, OW, ceil(O/32)], v_last float32 [Nb, OH, OW, O] and the neuron's parameters.
struct BitConvLifCall {
  BitConvGeometry g;
  at::Tensor mul, add, spikes, v_last;
  NeuronParams np;
  const uint32_t* x;
  const uint32_t* planes;
  uint32_t* spikes_ptr;
};

inline BitConvLifCall bitconv_lif_call(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& mul,
                                       const at::Tensor& add, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, int64_t T, double v_threshold,
                                       double v_reset, bool soft_reset, int64_t kind, bool decay_input) {
  BitConvLifCall c{bitconv_geometry(x, planes, stride, padding, dilation, groups)};
  const int64_t O = planes.size(1);
  TORCH_CHECK(T >= 1 && c.g.N % T == 0, "bitconv2d_lif: the batch of x must be T * N");
  TORCH_CHECK(groups == 1 || c.g.out_per_group % 32 == 0, "bitconv2d_lif: groups > 1 needs O / groups % 32 == 0");
  TORCH_CHECK(mul.scalar_type() == at::kFloat && add.scalar_type() == at::kFloat && mul.numel() == O &&
                  add.numel() == O, "bitconv2d_lif: mul and add must be float32 [O]");
  c.mul = mul.contiguous();
  c.add = add.contiguous();
  c.spikes = at::zeros({c.g.N, c.g.OH, c.g.OW, (O + 31) / 32}, x.options());
  c.v_last = at::empty({c.g.N / T, c.g.OH, c.g.OW, O}, x.options().dtype(at::kFloat));
  c.np = neuron_params(static_cast<float>(v_threshold), soft_reset ? 0.0f : static_cast<float>(v_reset),
                       static_cast<int>(kind), soft_reset, decay_input, 0, 0, 0.0f);
  c.x = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  c.planes = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
  c.spikes_ptr = reinterpret_cast<uint32_t*>(c.spikes.data_ptr<int32_t>());
  return c;
}

}  // namespace cbp
