// Host launchers of the CUDA constraint kernels (csrc/cuda/constraint.cuh) for the
// extension's CUDA dispatch key; the entry points are declared once in csrc/common/constraint_api.h.
// constraint_pass: the launch table (the layers' sizes and base addresses, one (layer, start)
// per chunk) is built on the host and sent in one asynchronous copy, and ONE kernel launch
// covers every layer; the float64 block partials are summed on the device (no host sync).
// constraint_multiplier_step: the same table (exp_avg / exp_avg_sq in the grad / lambda_grad
// columns) and ONE launch updating every layer's lambda, m and v in place.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/constraint_api.h"
#include "cuda/constraint.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

// The launch table of csrc/cuda/constraint.cuh, built in pinned memory and sent in one
// asynchronous copy: [numel | w | lambda | grad | lambda_grad] per layer, then (layer, start) per chunk
// (the multiplier step passes exp_avgs / exp_avg_sqs as grads / lambda_grads).
at::Tensor launch_table(at::TensorList weights, at::TensorList lambdas, at::TensorList grads,
                        at::TensorList lambda_grads, int64_t* n_chunks) {
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<int64_t> layers, starts;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t s = 0; s < weights[l].numel(); s += kConstraintChunk) {
      layers.push_back(l);
      starts.push_back(s);
    }
  }
  *n_chunks = static_cast<int64_t>(layers.size());
  auto host = at::empty({5 * L + 2 * *n_chunks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* m = host.data_ptr<int64_t>();
  auto address = [](at::TensorList list, int64_t l) {
    return list.empty() ? int64_t{0} : reinterpret_cast<int64_t>(list[l].data_ptr());
  };
  for (int64_t l = 0; l < L; ++l) {
    m[l] = weights[l].numel();
    m[L + l] = address(weights, l);
    m[2 * L + l] = address(lambdas, l);
    m[3 * L + l] = address(grads, l);
    m[4 * L + l] = address(lambda_grads, l);
  }
  std::copy(layers.begin(), layers.end(), m + 5 * L);
  std::copy(starts.begin(), starts.end(), m + 5 * L + *n_chunks);
  return host.to(weights[0].device(), /*non_blocking=*/true);
}

}  // namespace

at::Tensor constraint_pass_cuda(at::TensorList weights, at::TensorList lambdas, const at::Tensor& table,
                                at::TensorList grads, at::TensorList lambda_grads) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_pass: table must be float32 [L, 4, K]");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  int64_t n_chunks = 0;
  const auto meta = launch_table(weights, lambdas, grads, lambda_grads, &n_chunks);
  auto partial = at::zeros({std::max<int64_t>(n_chunks, 1), 2}, weights[0].options().dtype(at::kDouble));
  if (n_chunks > 0) {
    const auto tab = table.contiguous();
    const int k = static_cast<int>(tab.size(2));
    CBP_DISPATCH_STORAGE(weights[0].scalar_type(), "constraint_pass_cuda", [&] {
      const auto kernel = CBP_STORAGE_KERNEL(constraint_pass);
      kernel<<<grid_x(n_chunks), kConstraintThreads, kConstraintRows * k * sizeof(float),
               c10::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const long long*>(meta.data_ptr<int64_t>()), static_cast<int>(weights.size()),
          tab.data_ptr<float>(), k, partial.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return partial.sum(0);
}

void constraint_multiplier_step_cuda(at::TensorList weights, at::TensorList lambdas, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, const at::Tensor& table, const at::Tensor& scalars) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_multiplier_step: table must be float32 [L, 4, K]");
  TORCH_CHECK(scalars.numel() == kMultiplierScalars && scalars.scalar_type() == at::kFloat &&
                  scalars.device() == weights[0].device(),
              "constraint_multiplier_step: scalars must be float32 [8] on the weights' device");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  int64_t n_chunks = 0;
  const auto meta = launch_table(weights, lambdas, exp_avgs, exp_avg_sqs, &n_chunks);
  if (n_chunks == 0) return;
  const auto tab = table.contiguous();
  const auto h = scalars.contiguous();
  const int k = static_cast<int>(tab.size(2));
  CBP_DISPATCH_STORAGE(weights[0].scalar_type(), "constraint_multiplier_step_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(constraint_multiplier_step);
    kernel<<<grid_x(n_chunks), kConstraintThreads, kConstraintRows * k * sizeof(float),
             c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const long long*>(meta.data_ptr<int64_t>()), static_cast<int>(weights.size()),
        tab.data_ptr<float>(), k, h.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  CBP_DISPATCH_STORAGE(x.scalar_type(), "constraint_quantize_cuda", [&] {
    const auto kernel = CBP_STORAGE_KERNEL(constraint_quantize);
    kernel<<<blocks, kConstraintThreads, kConstraintRows * k * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
        device_ptr<scalar_t>(x), device_ptr<scalar_t>(out),
        tab.data_ptr<float>(), k, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  CBP_IMPL(m, ConstraintPassOp, constraint_pass_cuda);
  CBP_IMPL(m, ConstraintQuantizeOp, constraint_quantize_cuda);
  CBP_IMPL(m, ConstraintMultiplierStepOp, constraint_multiplier_step_cuda);
}

}  // namespace cbp
