// Host launchers of the CUDA neuron kernels (csrc/cuda/neuron.cuh) for the extension's
// CUDA dispatch key; the entry points are declared once in csrc/common/neuron_api.h. One
// launch each, on the current stream; the decay k stays on the device (no host sync), and
// PLIF's dL/dk is the float64 sum of the backward's per-block partials, rounded once to float32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/neuron_api.h"
#include "common/neuron_host.h"
#include "cuda/neuron.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {

std::vector<at::Tensor> neuron_forward_cuda(const at::Tensor& x_seq, const at::Tensor& v_init,
                                            const at::Tensor& decay, double v_threshold, double v_reset,
                                            bool soft_reset, int64_t kind, bool decay_input) {
  const c10::cuda::CUDAGuard guard(x_seq.device());
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto x = x_seq.contiguous();
  at::Tensor v0;
  const float* v0_data = optional_state(v_init, v0);
  auto k = decay.to(at::kFloat).contiguous();
  auto spike = at::empty_like(x);
  auto h_seq = at::empty_like(x);
  auto v_last = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float vr = soft_reset ? 0.0f : static_cast<float>(v_reset);
  const unsigned int blocks = blocks_for(N, kNeuronThreads);
  if (N == 0) return {spike, v_last, h_seq};
  CBP_DISPATCH_STORAGE(x.scalar_type(), "neuron_forward_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(neuron_forward);
    kernel<<<blocks, kNeuronThreads, 0, stream>>>(
        device_ptr<scalar_t>(x), v0_data, k.data_ptr<float>(), device_ptr<scalar_t>(spike),
        v_last.data_ptr<float>(), device_ptr<scalar_t>(h_seq), T, N, static_cast<float>(v_threshold), vr,
        static_cast<int>(kind), soft_reset, decay_input);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {spike, v_last, h_seq};
}

std::vector<at::Tensor> neuron_backward_cuda(const at::Tensor& grad_spike, const at::Tensor& grad_v_last,
                                             const at::Tensor& h_seq, const at::Tensor& spike_seq,
                                             const at::Tensor& x_seq, const at::Tensor& v_init,
                                             const at::Tensor& decay, double v_threshold, double v_reset,
                                             bool soft_reset, int64_t kind, bool decay_input, bool detach_reset,
                                             int64_t surrogate, double alpha, bool need_grad_decay) {
  const c10::cuda::CUDAGuard guard(h_seq.device());
  const int64_t T = h_seq.size(0);
  const int64_t N = h_seq.numel() / T;
  auto gs = grad_spike.contiguous();
  at::Tensor gvl, v0;
  const float* gvl_data = optional_state(grad_v_last, gvl);
  const float* v0_data = optional_state(v_init, v0);
  auto h = h_seq.contiguous();
  auto s = spike_seq.contiguous();
  auto x = x_seq.contiguous();  // empty unless need_grad_decay
  auto k = decay.to(at::kFloat).contiguous();
  auto grad_x = at::empty_like(h);
  auto grad_v_init = at::empty({v0_data != nullptr ? N : 0}, k.options());  // empty with an empty v_init
  const unsigned int blocks = blocks_for(N, kNeuronThreads);
  // PLIF's dL/dk: one float64 partial per block, every one written by the kernel.
  auto partial = at::empty({need_grad_decay ? int64_t{blocks} : 0}, k.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float vr = soft_reset ? 0.0f : static_cast<float>(v_reset);
  if (N == 0) return {grad_x, grad_v_init.view(v_init.sizes()), partial.sum().to(at::kFloat)};
  CBP_DISPATCH_STORAGE(h.scalar_type(), "neuron_backward_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(neuron_backward);
    kernel<<<blocks, kNeuronThreads, 0, stream>>>(
        device_ptr<scalar_t>(gs), gvl_data, device_ptr<scalar_t>(h), device_ptr<scalar_t>(s),
        need_grad_decay ? device_ptr<scalar_t>(x) : nullptr, v0_data, k.data_ptr<float>(),
        device_ptr<scalar_t>(grad_x), v0_data != nullptr ? grad_v_init.data_ptr<float>() : nullptr,
        need_grad_decay ? partial.data_ptr<double>() : nullptr, T, N,
        static_cast<float>(v_threshold), vr, static_cast<int>(kind), soft_reset, decay_input, detach_reset,
        static_cast<int>(surrogate), static_cast<float>(alpha), need_grad_decay);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_v_init.view(v_init.sizes()), partial.sum().to(at::kFloat)};
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  CBP_IMPL(m, NeuronForwardOp, neuron_forward_cuda);
  CBP_IMPL(m, NeuronBackwardOp, neuron_backward_cuda);
}

}  // namespace cbp
