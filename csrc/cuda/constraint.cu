// Host launchers of the CUDA constraint kernels (csrc/cuda/constraint.cuh) for the
// extension's CUDA dispatch key; the schemas are defined once in csrc/cpu/constraint.cpp.
// constraint_pass: the chunk table (layer, start) and the layers' base addresses are built on
// the host, copied to the device, and ONE kernel launch covers every layer; the float64
// block partials are summed on the device (no host sync).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/constraint.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

template <typename scalar_t>
struct ConstraintKernels;
template <>
struct ConstraintKernels<float> {
  using device_t = float;
  static constexpr auto pass = constraint_pass_f32;
  static constexpr auto quantize = constraint_quantize_f32;
};
template <>
struct ConstraintKernels<at::Half> {
  using device_t = __half;
  static constexpr auto pass = constraint_pass_f16;
  static constexpr auto quantize = constraint_quantize_f16;
};
template <>
struct ConstraintKernels<at::BFloat16> {
  using device_t = __nv_bfloat16;
  static constexpr auto pass = constraint_pass_bf16;
  static constexpr auto quantize = constraint_quantize_bf16;
};

#define CBP_CONSTRAINT_DISPATCH(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor addresses(at::TensorList tensors, const at::Tensor& like) {
  std::vector<int64_t> ptrs;
  for (const auto& t : tensors) ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  if (ptrs.empty()) ptrs.push_back(0);
  return at::tensor(ptrs, at::kLong).to(like.device(), /*non_blocking=*/false);
}

at::Tensor constraint_pass_cuda(at::TensorList weights, at::TensorList lambdas, const at::Tensor& table,
                                at::TensorList grads, at::TensorList lambda_grads) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_pass: table must be float32 [L, 4, K]");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const auto& ref = weights[0];
  std::vector<int64_t> numels, starts;
  std::vector<int32_t> layers;
  for (int64_t l = 0; l < static_cast<int64_t>(weights.size()); ++l) {
    numels.push_back(weights[l].numel());
    for (int64_t s = 0; s < weights[l].numel(); s += kConstraintChunk) {
      layers.push_back(static_cast<int32_t>(l));
      starts.push_back(s);
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(layers.size());
  auto partial = at::zeros({std::max<int64_t>(n_chunks, 1), 2}, ref.options().dtype(at::kDouble));
  if (n_chunks > 0) {
    const auto dev_numels = at::tensor(numels, at::kLong).to(ref.device());
    const auto dev_layers = at::tensor(layers, at::kInt).to(ref.device());
    const auto dev_starts = at::tensor(starts, at::kLong).to(ref.device());
    const auto w_ptrs = addresses(weights, ref), lam_ptrs = addresses(lambdas, ref);
    const auto grad_ptrs = addresses(grads, ref), lgrad_ptrs = addresses(lambda_grads, ref);
    const auto tab = table.contiguous();
    const int k = static_cast<int>(tab.size(2));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    CBP_CONSTRAINT_DISPATCH(ref.scalar_type(), "constraint_pass_cuda", [&] {
      ConstraintKernels<scalar_t>::pass<<<static_cast<unsigned int>(n_chunks), kConstraintThreads,
                                          kConstraintRows * k * sizeof(float), stream>>>(
          reinterpret_cast<const unsigned long long*>(w_ptrs.data_ptr<int64_t>()),
          reinterpret_cast<const unsigned long long*>(lam_ptrs.data_ptr<int64_t>()),
          reinterpret_cast<const unsigned long long*>(grad_ptrs.data_ptr<int64_t>()),
          reinterpret_cast<const unsigned long long*>(lgrad_ptrs.data_ptr<int64_t>()),
          reinterpret_cast<const long long*>(dev_numels.data_ptr<int64_t>()), dev_layers.data_ptr<int32_t>(),
          reinterpret_cast<const long long*>(dev_starts.data_ptr<int64_t>()), tab.data_ptr<float>(), k,
          partial.data_ptr<double>(), grads.empty() ? 0 : 1, lambda_grads.empty() ? 0 : 1);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return partial.sum(0);
}

at::Tensor constraint_quantize_cuda(const at::Tensor& w, const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 3 && table.size(0) == 1 && table.size(1) == kConstraintRows &&
                  table.scalar_type() == at::kFloat,
              "constraint_quantize: table must be float32 [1, 4, K]");
  const c10::cuda::CUDAGuard guard(w.device());
  const auto x = w.contiguous();
  const auto tab = table.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int k = static_cast<int>(tab.size(2));
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>((n + kConstraintThreads - 1) / kConstraintThreads, 65535));
  CBP_CONSTRAINT_DISPATCH(x.scalar_type(), "constraint_quantize_cuda", [&] {
    using device_t = typename ConstraintKernels<scalar_t>::device_t;
    ConstraintKernels<scalar_t>::quantize<<<blocks, kConstraintThreads, kConstraintRows * k * sizeof(float),
                                            c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const device_t*>(x.data_ptr<scalar_t>()), reinterpret_cast<device_t*>(out.data_ptr<scalar_t>()),
        tab.data_ptr<float>(), k, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  m.impl("constraint_pass", &constraint_pass_cuda);
  m.impl("constraint_quantize", &constraint_quantize_cuda);
}

}  // namespace cbp
