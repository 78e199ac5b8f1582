// Host side of the CUDA sigmoid-sum quantizer: fills the level table, launches the kernels of
// sigmoid_quant.cuh on the current stream, registers the CUDA implementations of the schemas
// defined in csrc/cpu/sigmoid_quant.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/sigmoid_quant.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// The sum of sigmoids both kernels evaluate: alpha, beta (float32 on the device), the
// temperature, the sigmoids' gaps and midpoints, and the offset.
struct SigmoidSum {
  const float *alpha, *beta;
  float temperature;
  const float *gaps, *mids;
  int n_sig;
  float offset;
};

SigmoidSum sigmoid_sum(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gaps, const at::Tensor& mids,
                       double offset, double temperature) {
  TORCH_CHECK(gaps.numel() <= kMaxSigmoids, "sigmoid_quant: at most ", kMaxSigmoids, " sigmoids");
  return {alpha.data_ptr<float>(), beta.data_ptr<float>(), static_cast<float>(temperature), gaps.data_ptr<float>(),
          mids.data_ptr<float>(), static_cast<int>(gaps.numel()), static_cast<float>(offset)};
}

at::Tensor forward_cuda(const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gaps,
                        const at::Tensor& mids, double offset, double temperature) {
  const SigmoidSum q = sigmoid_sum(alpha, beta, gaps, mids, offset, temperature);
  auto wc = w.contiguous();
  auto y = at::empty_like(wc);
  const int64_t n = wc.numel();
  CBP_DISPATCH_STORAGE(wc.scalar_type(), "sigmoid_quant_forward_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(sigmoid_quant_forward);
    kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        device_ptr<scalar_t>(wc), device_ptr<scalar_t>(y), n, q.alpha, q.beta, q.temperature, q.gaps, q.mids,
        q.n_sig, q.offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_y, const at::Tensor& w, const at::Tensor& alpha,
                                      const at::Tensor& beta, const at::Tensor& gaps, const at::Tensor& mids,
                                      double offset, double temperature) {
  const SigmoidSum q = sigmoid_sum(alpha, beta, gaps, mids, offset, temperature);
  auto wc = w.contiguous();
  auto gy = grad_y.contiguous();
  auto grad_w = at::empty_like(wc);
  auto grad_a = at::zeros({}, alpha.options());
  auto grad_b = at::zeros({}, beta.options());
  const int64_t n = wc.numel();
  CBP_DISPATCH_STORAGE(wc.scalar_type(), "sigmoid_quant_backward_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(sigmoid_quant_backward);
    kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        device_ptr<scalar_t>(gy), device_ptr<scalar_t>(wc), device_ptr<scalar_t>(grad_w), grad_a.data_ptr<float>(),
        grad_b.data_ptr<float>(), n, q.alpha, q.beta, q.temperature, q.gaps, q.mids, q.n_sig, q.offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  m.impl("sigmoid_quant_forward", &forward_cuda);
  m.impl("sigmoid_quant_backward", &backward_cuda);
}

}  // namespace cbp
