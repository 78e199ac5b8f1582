// Host side of the CUDA sigmoid-sum quantizer (entry points declared in
// csrc/common/sigmoid_quant_api.h): takes float32 contiguous copies of the parameters and the
// level table (as the CPU kernel), launches the kernels of sigmoid_quant.cuh on the current
// stream of w's device, and adds the backward's float64 block partials up.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/sigmoid_quant_api.h"
#include "cuda/sigmoid_quant.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

// The sum of sigmoids both kernels evaluate: alpha, beta (float32 on the device), the
// temperature, the sigmoids' gaps and midpoints, and the offset; `keep` holds the float32
// contiguous copies alive.
struct SigmoidSumArgs {
  std::vector<at::Tensor> keep;
  const float *alpha, *beta;
  float temperature;
  const float *gaps, *mids;
  int n_sig;
  float offset;
};

SigmoidSumArgs sigmoid_sum_args(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gaps,
                                const at::Tensor& mids, double offset, double temperature) {
  TORCH_CHECK(gaps.numel() <= kMaxSigmoids && mids.numel() == gaps.numel(), "sigmoid_quant: gaps and mids must hold ",
              "the same number of sigmoids, at most ", kMaxSigmoids);
  SigmoidSumArgs q;
  for (const at::Tensor* t : {&alpha, &beta, &gaps, &mids}) q.keep.push_back(t->to(at::kFloat).contiguous());
  q.alpha = q.keep[0].data_ptr<float>();
  q.beta = q.keep[1].data_ptr<float>();
  q.temperature = static_cast<float>(temperature);
  q.gaps = q.keep[2].data_ptr<float>();
  q.mids = q.keep[3].data_ptr<float>();
  q.n_sig = static_cast<int>(gaps.numel());
  q.offset = static_cast<float>(offset);
  return q;
}

}  // namespace

at::Tensor sigmoid_quant_forward_cuda(const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& beta,
                                      const at::Tensor& gaps, const at::Tensor& mids, double offset,
                                      double temperature) {
  const c10::cuda::CUDAGuard guard(w.device());
  const SigmoidSumArgs q = sigmoid_sum_args(alpha, beta, gaps, mids, offset, temperature);
  auto wc = w.contiguous();
  auto y = at::empty_like(wc);
  const int64_t n = wc.numel();
  if (n == 0) return y;
  CBP_DISPATCH_STORAGE(wc.scalar_type(), "sigmoid_quant_forward_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(sigmoid_quant_forward);
    kernel<<<blocks_for(n, kSigmoidQuantThreads), kSigmoidQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        device_ptr<scalar_t>(wc), device_ptr<scalar_t>(y), n, q.alpha, q.beta, q.temperature, q.gaps, q.mids,
        q.n_sig, q.offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> sigmoid_quant_backward_cuda(const at::Tensor& grad_y, const at::Tensor& w,
                                                    const at::Tensor& alpha, const at::Tensor& beta,
                                                    const at::Tensor& gaps, const at::Tensor& mids, double offset,
                                                    double temperature) {
  const c10::cuda::CUDAGuard guard(w.device());
  const SigmoidSumArgs q = sigmoid_sum_args(alpha, beta, gaps, mids, offset, temperature);
  auto wc = w.contiguous();
  auto gy = grad_y.contiguous();
  auto grad_w = at::empty_like(wc);
  const int64_t n = wc.numel();
  const unsigned int blocks = blocks_for(n, kSigmoidQuantThreads);
  auto partial = at::zeros({int64_t{blocks}, 2}, wc.options().dtype(at::kDouble));  // every row written when n > 0
  if (n > 0) {
    CBP_DISPATCH_STORAGE(wc.scalar_type(), "sigmoid_quant_backward_cuda", [&] {
      const auto kernel = CBP_STORAGE_KERNEL(sigmoid_quant_backward);
      kernel<<<blocks, kSigmoidQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          device_ptr<scalar_t>(gy), device_ptr<scalar_t>(wc), device_ptr<scalar_t>(grad_w),
          partial.data_ptr<double>(), n, q.alpha, q.beta, q.temperature, q.gaps, q.mids, q.n_sig, q.offset);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto sums = partial.sum(0).to(alpha.scalar_type());  // (grad_alpha, grad_beta)
  return {grad_w, sums[0], sums[1]};
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  CBP_IMPL(m, SigmoidQuantForwardOp, sigmoid_quant_forward_cuda);
  CBP_IMPL(m, SigmoidQuantBackwardOp, sigmoid_quant_backward_cuda);
}

}  // namespace cbp
