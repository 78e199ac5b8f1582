// Host side of the CUDA sigmoid-sum quantizer: fills the level table, launches the kernels of
// sigmoid_quant.cuh on the current stream, registers the CUDA implementations of the schemas
// defined in csrc/cpu/sigmoid_quant.cpp.
#include <ATen/ATen.h>
#include "cuda/torch_cuda.h"
#include <torch/library.h>

#include <vector>

#include "cuda/sigmoid_quant.cuh"

namespace cbp {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Calls kernel_f32 / _f16 / _bf16 with the tensor's storage type.
#define CBP_DISPATCH_STORAGE(dtype, F32, F16, BF16)                                   \
  switch (dtype) {                                                                   \
    case at::kFloat: { using T_ = float; F32; break; }                               \
    case at::kHalf: { using T_ = __half; F16; break; }                               \
    case at::kBFloat16: { using T_ = __nv_bfloat16; BF16; break; }                   \
    default: TORCH_CHECK(false, "sigmoid_quant (cuda): unsupported dtype ", dtype); \
  }

at::Tensor forward_cuda(const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gaps,
                        const at::Tensor& mids, double offset, double temperature) {
  auto wc = w.contiguous();
  auto y = at::empty_like(wc);
  const int64_t n = wc.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float *a = alpha.data_ptr<float>(), *b = beta.data_ptr<float>();
  const float T = static_cast<float>(temperature);
  TORCH_CHECK(gaps.numel() <= kMaxSigmoids, "sigmoid_quant: at most ", kMaxSigmoids, " sigmoids");
  const float *gp = gaps.data_ptr<float>(), *mp = mids.data_ptr<float>();
  const int ns = static_cast<int>(gaps.numel());
  const float o = static_cast<float>(offset);
#define LAUNCH(kernel)                                                                                             \
  kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T_*>(wc.data_ptr()), static_cast<T_*>(y.data_ptr()), \
                                                 n, a, b, T, gp, mp, ns, o)
  CBP_DISPATCH_STORAGE(wc.scalar_type(), LAUNCH(sigmoid_quant_forward_f32), LAUNCH(sigmoid_quant_forward_f16),
                       LAUNCH(sigmoid_quant_forward_bf16))
#undef LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_y, const at::Tensor& w, const at::Tensor& alpha,
                                      const at::Tensor& beta, const at::Tensor& gaps, const at::Tensor& mids,
                                      double offset, double temperature) {
  auto wc = w.contiguous();
  auto gy = grad_y.contiguous();
  auto grad_w = at::empty_like(wc);
  auto grad_a = at::zeros({}, alpha.options());
  auto grad_b = at::zeros({}, beta.options());
  const int64_t n = wc.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float *a = alpha.data_ptr<float>(), *b = beta.data_ptr<float>();
  float *ga = grad_a.data_ptr<float>(), *gb = grad_b.data_ptr<float>();
  const float T = static_cast<float>(temperature);
  TORCH_CHECK(gaps.numel() <= kMaxSigmoids, "sigmoid_quant: at most ", kMaxSigmoids, " sigmoids");
  const float *gp = gaps.data_ptr<float>(), *mp = mids.data_ptr<float>();
  const int ns = static_cast<int>(gaps.numel());
  const float o = static_cast<float>(offset);
#define LAUNCH(kernel)                                                                                   \
  kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T_*>(gy.data_ptr()),                  \
                                                 static_cast<const T_*>(wc.data_ptr()),                  \
                                                 static_cast<T_*>(grad_w.data_ptr()), ga, gb, n, a, b, T, gp, mp, ns, o)
  CBP_DISPATCH_STORAGE(wc.scalar_type(), LAUNCH(sigmoid_quant_backward_f32), LAUNCH(sigmoid_quant_backward_f16),
                       LAUNCH(sigmoid_quant_backward_bf16))
#undef LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  m.impl("sigmoid_quant_forward", &forward_cuda);
  m.impl("sigmoid_quant_backward", &backward_cuda);
}

}  // namespace cbp
