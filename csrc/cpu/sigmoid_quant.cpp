// Sigmoid-sum weight quantizer on the CPU: forward y(w) and the backward's three gradients
// (w elementwise; alpha and beta reduced in double) in one pass each.
// Equations: csrc/common/sigmoid_quant_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "common/sigmoid_quant_api.h"
#include "common/sigmoid_quant_math.h"

namespace cbp {
namespace {

struct Table {
  float gaps[kMaxSigmoids], mids[kMaxSigmoids];
  int n;
};

Table make_table(const at::Tensor& gaps, const at::Tensor& mids) {
  Table t{};
  auto g = gaps.to(at::kFloat).contiguous(), m = mids.to(at::kFloat).contiguous();
  t.n = static_cast<int>(g.numel());
  TORCH_CHECK(t.n <= kMaxSigmoids, "sigmoid_quant: at most ", kMaxSigmoids, " sigmoids");
  for (int i = 0; i < t.n; ++i) t.gaps[i] = g.data_ptr<float>()[i], t.mids[i] = m.data_ptr<float>()[i];
  return t;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* w, scalar_t* y, int64_t n, float alpha, float beta, float T, const Table& tab,
                    float offset) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const SigmoidSum r = sigmoid_sum(static_cast<float>(w[i]), beta, T, tab.gaps, tab.mids, tab.n, offset);
    y[i] = static_cast<scalar_t>(alpha * r.value);
  }
}

// grad_w elementwise; grad_alpha = sum gy * value, grad_beta = sum gy * alpha * w * T * slope.
template <typename scalar_t>
void backward_kernel(const scalar_t* gy, const scalar_t* w, scalar_t* gw, int64_t n, float alpha, float beta,
                     float T, const Table& tab, float offset, double* sum_alpha, double* sum_beta) {
  double sa = 0.0, sb = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const float wi = static_cast<float>(w[i]);
    const float gi = static_cast<float>(gy[i]);
    const SigmoidSum r = sigmoid_sum(wi, beta, T, tab.gaps, tab.mids, tab.n, offset);
    gw[i] = static_cast<scalar_t>(gi * alpha * beta * T * r.slope);
    sa += gi * r.value;
    sb += gi * alpha * wi * T * r.slope;
  }
  *sum_alpha = sa;
  *sum_beta = sb;
}

}  // namespace

at::Tensor sigmoid_quant_forward_cpu(const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& beta,
                                     const at::Tensor& gaps, const at::Tensor& mids, double offset, double temperature) {
  const Table tab = make_table(gaps, mids);
  auto wc = w.contiguous();
  auto y = at::empty_like(wc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "sigmoid_quant_forward_cpu", [&] {
    forward_kernel<scalar_t>(wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), wc.numel(), alpha.item<float>(),
                             beta.item<float>(), static_cast<float>(temperature), tab, static_cast<float>(offset));
  });
  return y;
}

std::vector<at::Tensor> sigmoid_quant_backward_cpu(const at::Tensor& grad_y, const at::Tensor& w,
                                                   const at::Tensor& alpha, const at::Tensor& beta,
                                                   const at::Tensor& gaps, const at::Tensor& mids, double offset,
                                                   double temperature) {
  const Table tab = make_table(gaps, mids);
  auto wc = w.contiguous();
  auto gy = grad_y.contiguous();
  auto grad_w = at::empty_like(wc);
  double sum_alpha = 0.0, sum_beta = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "sigmoid_quant_backward_cpu", [&] {
    backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
                              wc.numel(), alpha.item<float>(), beta.item<float>(), static_cast<float>(temperature),
                              tab, static_cast<float>(offset), &sum_alpha, &sum_beta);
  });
  auto opts = alpha.options();
  return {grad_w, at::scalar_tensor(sum_alpha, opts), at::scalar_tensor(sum_beta, opts)};
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, SigmoidQuantForwardOp, sigmoid_quant_forward_cpu);
  CBP_IMPL(m, SigmoidQuantBackwardOp, sigmoid_quant_backward_cpu);
}

}  // namespace cbp
