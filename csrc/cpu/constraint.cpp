// The CBP constraint on the CPU (math: csrc/common/constraint_math.h, spec:
// cbp_kernels/ops/constraint/reference.py).
//
// constraint_pass: ONE multi-tensor pass over all quantized layers. The layers are cut into
// chunks of kChunk elements (a table of (layer, start, length)); OpenMP threads take chunks,
// and per chunk one vectorised loop computes, for every weight w with multiplier lam,
//   sum lam * cs(w; g),  sum cs(w),  grad += lam * dcs/dw,  lambda_grad = cs(w; g).
// Per-chunk partial sums (float64) are added in chunk order, so the result does not depend
// on the thread count. The loop is specialised for K = 2 and 3 levels (constant trip count:
// fully unrolled, branch-free selects) with a generic fallback, and compiled twice: for
// AVX-512 (chosen at run time when the CPU has it) and for the baseline x86-64 ISA.
//
// constraint_quantize: Q(w) elementwise, the same selection.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/constraint_math.h"

namespace cbp {
namespace {

// Elements per work item: 32 Ki weights (128 KiB of float32 per stream) amortise the
// per-chunk setup; SEW-ResNet-34's 21.3M weights give ~650 chunks, plenty for any thread count.
constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t layer, start, len;
};

#if defined(__GNUC__) && defined(__x86_64__)
#define CBP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define CBP_INLINE __attribute__((always_inline)) inline
#else
#define CBP_AVX512
#define CBP_INLINE inline
#endif

bool cpu_has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// One chunk of the fused pass. KC > 0: the level count as a compile-time constant; KC == 0:
// the run-time count k. Returns the chunk's two sums in out[0..1].
template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
CBP_INLINE void pass_chunk_body(const scalar_t* __restrict w, const scalar_t* __restrict lam,
                                scalar_t* __restrict grad, scalar_t* __restrict lgrad,
                                const float* table_row, int k, int64_t n, double* out) {
  const int K = KC > 0 ? KC : k;
  float row[kConstraintRows * (KC > 0 ? KC : 1)];
  const float* r = table_row;
  if constexpr (KC > 0) {
    std::copy(table_row, table_row + kConstraintRows * KC, row);
    r = row;
  }
  double sum_l = 0.0, sum_f = 0.0;
#pragma omp simd reduction(+ : sum_l, sum_f)
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(w[i]);
    const float l = static_cast<float>(lam[i]);
    float keep;
    const float q = constraint_select(x, r, K, &keep);
    const float free = constraint_free(x, q);
    const float c = free * keep;
    sum_l += static_cast<double>(l * c);
    sum_f += static_cast<double>(free);
    if constexpr (GRAD) grad[i] = static_cast<scalar_t>(static_cast<float>(grad[i]) + l * constraint_slope(x, q, keep));
    if constexpr (LGRAD) lgrad[i] = static_cast<scalar_t>(c);
  }
  out[0] = sum_l;
  out[1] = sum_f;
}

template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
CBP_AVX512 void pass_chunk_avx512(const scalar_t* w, const scalar_t* lam, scalar_t* grad, scalar_t* lgrad,
                                  const float* row, int k, int64_t n, double* out) {
  pass_chunk_body<scalar_t, KC, GRAD, LGRAD>(w, lam, grad, lgrad, row, k, n, out);
}

template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
void pass_chunk_base(const scalar_t* w, const scalar_t* lam, scalar_t* grad, scalar_t* lgrad, const float* row,
                     int k, int64_t n, double* out) {
  pass_chunk_body<scalar_t, KC, GRAD, LGRAD>(w, lam, grad, lgrad, row, k, n, out);
}

template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
void pass_all(const std::vector<Chunk>& chunks, at::TensorList weights, at::TensorList lambdas,
              at::TensorList grads, at::TensorList lambda_grads, const float* table, int k, double* partial) {
  const bool avx512 = cpu_has_avx512();
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const scalar_t* w = weights[ch.layer].const_data_ptr<scalar_t>() + ch.start;
    const scalar_t* lam = lambdas[ch.layer].const_data_ptr<scalar_t>() + ch.start;
    scalar_t* grad = GRAD ? grads[ch.layer].mutable_data_ptr<scalar_t>() + ch.start : nullptr;
    scalar_t* lgrad = LGRAD ? lambda_grads[ch.layer].mutable_data_ptr<scalar_t>() + ch.start : nullptr;
    const float* row = table + ch.layer * kConstraintRows * k;
    if (avx512) {
      pass_chunk_avx512<scalar_t, KC, GRAD, LGRAD>(w, lam, grad, lgrad, row, k, ch.len, partial + 2 * c);
    } else {
      pass_chunk_base<scalar_t, KC, GRAD, LGRAD>(w, lam, grad, lgrad, row, k, ch.len, partial + 2 * c);
    }
  }
}

// Picks the specialisation: the level count (2, 3 or any) and which outputs are written.
template <typename scalar_t>
void pass_dispatch(const std::vector<Chunk>& chunks, at::TensorList weights, at::TensorList lambdas,
                   at::TensorList grads, at::TensorList lambda_grads, const float* table, int k, double* partial) {
  const bool g = !grads.empty(), lg = !lambda_grads.empty();
  auto with_k = [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    if (g && lg) pass_all<scalar_t, KC, true, true>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else if (g) pass_all<scalar_t, KC, true, false>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else if (lg) pass_all<scalar_t, KC, false, true>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else pass_all<scalar_t, KC, false, false>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
  };
  if (k == 2) with_k(std::integral_constant<int, 2>{});
  else if (k == 3) with_k(std::integral_constant<int, 3>{});
  else with_k(std::integral_constant<int, 0>{});
}

at::Tensor constraint_pass(at::TensorList weights, at::TensorList lambdas, const at::Tensor& table,
                           at::TensorList grads, at::TensorList lambda_grads) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_pass: table must be float32 [L, 4, K]");
  const auto tab = table.contiguous();
  const int k = static_cast<int>(tab.size(2));
  std::vector<Chunk> chunks;
  for (int64_t l = 0; l < static_cast<int64_t>(weights.size()); ++l) {
    const int64_t n = weights[l].numel();
    for (int64_t start = 0; start < n; start += kChunk) chunks.push_back({l, start, std::min(kChunk, n - start)});
  }
  std::vector<double> partial(2 * chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "constraint_pass_cpu", [&] {
    pass_dispatch<scalar_t>(chunks, weights, lambdas, grads, lambda_grads, tab.const_data_ptr<float>(), k,
                            partial.data());
  });
  double sum_l = 0.0, sum_f = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    sum_l += partial[2 * c];
    sum_f += partial[2 * c + 1];
  }
  auto out = at::empty({2}, weights[0].options().dtype(at::kDouble));
  out[0] = sum_l;
  out[1] = sum_f;
  return out;
}

// Q(w) elementwise: out = l_k, k = #{j : w >= m_j}.
template <typename scalar_t>
void quantize_kernel(const scalar_t* w, scalar_t* out, const float* row, int k, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
#pragma omp simd
    for (int64_t i = start; i < end; ++i) {
      float keep;
      out[i] = static_cast<scalar_t>(constraint_select(static_cast<float>(w[i]), row, k, &keep));
    }
  }
}

at::Tensor constraint_quantize(const at::Tensor& w, const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 3 && table.size(0) == 1 && table.size(1) == kConstraintRows &&
                  table.scalar_type() == at::kFloat,
              "constraint_quantize: table must be float32 [1, 4, K]");
  const auto x = w.contiguous();
  const auto tab = table.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "constraint_quantize_cpu", [&] {
    quantize_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              tab.const_data_ptr<float>(), static_cast<int>(tab.size(2)), x.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext, m) {
  m.def(
      "constraint_pass(Tensor[] weights, Tensor[] lambdas, Tensor table, Tensor(a!)[] grads, "
      "Tensor(b!)[] lambda_grads) -> Tensor");
  m.def("constraint_quantize(Tensor w, Tensor table) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  m.impl("constraint_pass", &constraint_pass);
  m.impl("constraint_quantize", &constraint_quantize);
}

}  // namespace cbp
