// The C++ entry points of the multi-step neuron, declared once for the CPU (csrc/cpu/neuron.cpp)
// and CUDA (csrc/cuda/neuron.cu) kernels; schemas and checks: csrc/common/op_schema.h.
// Equations: csrc/common/neuron_math.h.
//   neuron_forward(x_seq, v_init, decay, v_threshold, v_reset, soft_reset, kind, decay_input)
//     -> [spike_seq, v_last, h_seq]: x_seq [T, *] float32 / float16 / bfloat16, v_init [*]
//     float32 or empty (V[-1] = v_reset), decay one float (k = 1/tau); h_seq is empty on the CPU
//     (its backward recomputes H from x_seq).
//   neuron_backward(grad_spike, grad_v_last, h_seq, spike_seq, x_seq, v_init, decay, v_threshold,
//     v_reset, soft_reset, kind, decay_input, detach_reset, surrogate, alpha, need_grad_decay)
//     -> [grad_x, grad_v_init, grad_decay]: grad_v_last [*] float32 or empty (0); grad_decay
//     float32 0-dim (PLIF's dL/dk, 0 unless need_grad_decay).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "common/op_schema.h"

namespace cbp {

struct NeuronForwardOp {
  static constexpr const char* name = "neuron_forward";
  using Fn = std::vector<at::Tensor>(const at::Tensor& x_seq, const at::Tensor& v_init, const at::Tensor& decay,
                                     double v_threshold, double v_reset, bool soft_reset, int64_t kind,
                                     bool decay_input);
  static constexpr std::array<const char*, 8> args{"x_seq",   "v_init",     "decay", "v_threshold",
                                                   "v_reset", "soft_reset", "kind",  "decay_input"};
};
NeuronForwardOp::Fn neuron_forward_cpu, neuron_forward_cuda;

struct NeuronBackwardOp {
  static constexpr const char* name = "neuron_backward";
  using Fn = std::vector<at::Tensor>(const at::Tensor& grad_spike, const at::Tensor& grad_v_last,
                                     const at::Tensor& h_seq, const at::Tensor& spike_seq, const at::Tensor& x_seq,
                                     const at::Tensor& v_init, const at::Tensor& decay, double v_threshold,
                                     double v_reset, bool soft_reset, int64_t kind, bool decay_input,
                                     bool detach_reset, int64_t surrogate, double alpha, bool need_grad_decay);
  static constexpr std::array<const char*, 16> args{
      "grad_spike", "grad_v_last", "h_seq",      "spike_seq",   "x_seq",        "v_init",
      "decay",      "v_threshold", "v_reset",    "soft_reset",  "kind",         "decay_input",
      "detach_reset", "surrogate", "alpha",      "need_grad_decay"};
};
NeuronBackwardOp::Fn neuron_backward_cpu, neuron_backward_cuda;

}  // namespace cbp
