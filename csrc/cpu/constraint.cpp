// The CBP constraint on the CPU (math: csrc/common/constraint_math.h, spec:
// cbp_kernels/ops/constraint/reference.py).
//
// constraint_pass: ONE multi-tensor pass over all quantized layers. The layers are cut into
// chunks of kChunk elements (a table of (layer, start, length)); OpenMP threads take chunks,
// and per chunk one vectorised loop computes, for every weight w with multiplier lam,
//   sum lam * cs(w; g),  sum cs(w),  grad += lam * dcs/dw,  lambda_grad = cs(w; g).
// Per-chunk partial sums (float64) are added in chunk order, so the result does not depend
// on the thread count. The loop is specialised for K = 2 and 3 levels (constant trip count:
// fully unrolled, branch-free selects) with a generic fallback, and compiled three times: for
// AVX-512, for AVX2 and for the baseline x86-64 ISA, the best the CPU has chosen at run time.
//
// constraint_multiplier_step: the same chunks and ISA clones; per weight, cs(w; g) and one
// gradient-ascent Adam / AdamW step of its multiplier (multiplier_adam: lambda, m, v in place).
//
// constraint_quantize: Q(w) elementwise, the same selection.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/constraint_api.h"
#include "common/constraint_math.h"
#include "cpu/isa.h"

namespace cbp {
namespace {

// Elements per work item: 32 Ki weights (128 KiB of float32 per stream) amortise the
// per-chunk setup; SEW-ResNet-34's 21.3M weights give ~650 chunks, plenty for any thread count.
constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t layer, start, len;
};

// The instruction sets the chunk loop is compiled for (the best one the CPU has runs).
#if defined(__GNUC__) && defined(__x86_64__)
#define CBP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define CBP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CBP_INLINE __attribute__((always_inline)) inline
#define CBP_INLINE_LAMBDA __attribute__((always_inline))
#else
#define CBP_TARGET_AVX512
#define CBP_TARGET_AVX2
#define CBP_INLINE inline
#define CBP_INLINE_LAMBDA
#endif

Isa hardware_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const Isa isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl"))
                             ? Isa::kAvx512
                             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::kAvx2
                                                                                                 : Isa::kBase;
  return isa;
#else
  return Isa::kBase;
#endif
}

// The best instruction set the CPU has, capped by the environment (cpu/isa.h).
Isa cpu_isa() { return std::min(hardware_isa(), isa_cap()); }

// Runs f() compiled for the given instruction set: f is an always-inline lambda, so each
// clone below inlines and vectorises it for its own target. Measured on a Xeon with AVX-512,
// one thread, the fused pass over 21.3M float32 weights: 23 ms with AVX-512, 102 ms with the
// x86-64 baseline's SSE2.
template <typename F>
CBP_TARGET_AVX512 void run_avx512(const F& f) { f(); }
template <typename F>
CBP_TARGET_AVX2 void run_avx2(const F& f) { f(); }
template <typename F>
void run_base(const F& f) { f(); }
template <typename F>
void run_isa(Isa isa, const F& f) {
  if (isa == Isa::kAvx512) run_avx512(f);
  else if (isa == Isa::kAvx2) run_avx2(f);
  else run_base(f);
}

// Calls f(std::integral_constant<int, KC>) with KC = k for 2 or 3 levels (the loops then have
// a constant trip count: fully unrolled selects), KC = 0 (run-time k) otherwise.
template <typename F>
void with_levels(int k, const F& f) {
  if (k == 2) f(std::integral_constant<int, 2>{});
  else if (k == 3) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 0>{});
}

// The table row in a local copy when its size is known at compile time (kept in registers).
template <int KC>
struct LocalRow {
  float values[kConstraintRows * (KC > 0 ? KC : 1)];
  const float* row;
  explicit LocalRow(const float* table_row) : row(table_row) {
    if constexpr (KC > 0) {
      std::copy(table_row, table_row + kConstraintRows * KC, values);
      row = values;
    }
  }
};

// One chunk of the fused pass (n weights); the chunk's two sums into out[0..1].
template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
CBP_INLINE void pass_chunk(const scalar_t* __restrict w, const scalar_t* __restrict lam, scalar_t* __restrict grad,
                           scalar_t* __restrict lgrad, const float* table_row, int k, int64_t n, double* out) {
  const int K = KC > 0 ? KC : k;
  const LocalRow<KC> local(table_row);
  const float* r = local.row;
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

// The layers cut into chunks of kChunk elements, in layer order.
std::vector<Chunk> make_chunks(at::TensorList weights) {
  std::vector<Chunk> chunks;
  for (int64_t l = 0; l < static_cast<int64_t>(weights.size()); ++l) {
    const int64_t n = weights[l].numel();
    for (int64_t start = 0; start < n; start += kChunk) chunks.push_back({l, start, std::min(kChunk, n - start)});
  }
  return chunks;
}

// OpenMP threads over the chunks; body(chunk, index) runs compiled for the CPU's instruction
// set (body: an always-inline lambda, so each ISA clone inlines and vectorises it).
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& body) {
  const Isa isa = cpu_isa();
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    run_isa(isa, [&]() CBP_INLINE_LAMBDA { body(chunks[c], c); });
  }
}

template <typename scalar_t, int KC, bool GRAD, bool LGRAD>
void pass_all(const std::vector<Chunk>& chunks, at::TensorList weights, at::TensorList lambdas,
              at::TensorList grads, at::TensorList lambda_grads, const float* table, int k, double* partial) {
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t c) CBP_INLINE_LAMBDA {
    const scalar_t* w = weights[ch.layer].const_data_ptr<scalar_t>() + ch.start;
    const scalar_t* lam = lambdas[ch.layer].const_data_ptr<scalar_t>() + ch.start;
    scalar_t* grad = GRAD ? grads[ch.layer].mutable_data_ptr<scalar_t>() + ch.start : nullptr;
    scalar_t* lgrad = LGRAD ? lambda_grads[ch.layer].mutable_data_ptr<scalar_t>() + ch.start : nullptr;
    const float* row = table + ch.layer * kConstraintRows * k;
    pass_chunk<scalar_t, KC, GRAD, LGRAD>(w, lam, grad, lgrad, row, k, ch.len, partial + 2 * c);
  });
}

// Picks the specialisation: the level count (2, 3 or any) and which outputs are written.
template <typename scalar_t>
void pass_dispatch(const std::vector<Chunk>& chunks, at::TensorList weights, at::TensorList lambdas,
                   at::TensorList grads, at::TensorList lambda_grads, const float* table, int k, double* partial) {
  const bool g = !grads.empty(), lg = !lambda_grads.empty();
  with_levels(k, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    if (g && lg) pass_all<scalar_t, KC, true, true>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else if (g) pass_all<scalar_t, KC, true, false>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else if (lg) pass_all<scalar_t, KC, false, true>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
    else pass_all<scalar_t, KC, false, false>(chunks, weights, lambdas, grads, lambda_grads, table, k, partial);
  });
}

}  // namespace

at::Tensor constraint_pass_cpu(at::TensorList weights, at::TensorList lambdas, const at::Tensor& table,
                               at::TensorList grads, at::TensorList lambda_grads) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_pass: table must be float32 [L, 4, K]");
  const auto tab = table.contiguous();
  const int k = static_cast<int>(tab.size(2));
  const std::vector<Chunk> chunks = make_chunks(weights);
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

namespace {

// One chunk of the multiplier step (n weights): c = cs(w; g), then multiplier_adam on
// (lambda, m, v) in float32, each rounded once to the storage type.
template <typename scalar_t, int KC>
CBP_INLINE void step_chunk(const scalar_t* __restrict w, scalar_t* __restrict lam, scalar_t* __restrict m,
                           scalar_t* __restrict v, const float* table_row, int k, const float* scalars, int64_t n) {
  const int K = KC > 0 ? KC : k;
  const LocalRow<KC> local(table_row);
  const float* r = local.row;
  float h[kMultiplierScalars];
  std::copy(scalars, scalars + kMultiplierScalars, h);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(w[i]);
    float keep;
    const float q = constraint_select(x, r, K, &keep);
    const MultiplierState out = multiplier_adam(
        constraint_free(x, q) * keep, h,
        {static_cast<float>(lam[i]), static_cast<float>(m[i]), static_cast<float>(v[i])});
    lam[i] = static_cast<scalar_t>(out.lam);
    m[i] = static_cast<scalar_t>(out.m);
    v[i] = static_cast<scalar_t>(out.v);
  }
}

}  // namespace

void constraint_multiplier_step_cpu(at::TensorList weights, at::TensorList lambdas, at::TensorList exp_avgs,
                                    at::TensorList exp_avg_sqs, const at::Tensor& table, const at::Tensor& scalars) {
  TORCH_CHECK(table.dim() == 3 && table.size(1) == kConstraintRows && table.scalar_type() == at::kFloat &&
                  table.size(0) == static_cast<int64_t>(weights.size()),
              "constraint_multiplier_step: table must be float32 [L, 4, K]");
  TORCH_CHECK(scalars.numel() == kMultiplierScalars && scalars.scalar_type() == at::kFloat,
              "constraint_multiplier_step: scalars must be float32 [8]");
  const auto tab = table.contiguous();
  const auto h = scalars.contiguous();
  const int k = static_cast<int>(tab.size(2));
  const std::vector<Chunk> chunks = make_chunks(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "constraint_multiplier_step_cpu", [&] {
    with_levels(k, [&](auto kc) {
      constexpr int KC = decltype(kc)::value;
      for_each_chunk(chunks, [&](const Chunk& ch, int64_t) CBP_INLINE_LAMBDA {
        step_chunk<scalar_t, KC>(weights[ch.layer].const_data_ptr<scalar_t>() + ch.start,
                                 lambdas[ch.layer].mutable_data_ptr<scalar_t>() + ch.start,
                                 exp_avgs[ch.layer].mutable_data_ptr<scalar_t>() + ch.start,
                                 exp_avg_sqs[ch.layer].mutable_data_ptr<scalar_t>() + ch.start,
                                 tab.const_data_ptr<float>() + ch.layer * kConstraintRows * k, k,
                                 h.const_data_ptr<float>(), ch.len);
      });
    });
  });
}

namespace {

// Q(w) elementwise: out = l_k, k = #{j : w >= m_j}; chunks over OpenMP threads.
template <typename scalar_t, int KC>
void quantize_kernel(const scalar_t* w, scalar_t* out, const float* table_row, int k, int64_t n) {
  const Isa isa = cpu_isa();
#pragma omp parallel for schedule(static)
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    run_isa(isa, [&]() CBP_INLINE_LAMBDA {
      const int K = KC > 0 ? KC : k;
      const LocalRow<KC> local(table_row);
      const scalar_t* __restrict x = w + start;
      scalar_t* __restrict q = out + start;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float keep;
        q[i] = static_cast<scalar_t>(constraint_select(static_cast<float>(x[i]), local.row, K, &keep));
      }
    });
  }
}

}  // namespace

at::Tensor constraint_quantize_cpu(const at::Tensor& w, const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 3 && table.size(0) == 1 && table.size(1) == kConstraintRows &&
                  table.scalar_type() == at::kFloat,
              "constraint_quantize: table must be float32 [1, 4, K]");
  const auto x = w.contiguous();
  const auto tab = table.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "constraint_quantize_cpu", [&] {
    const int k = static_cast<int>(tab.size(2));
    with_levels(k, [&](auto kc) {
      quantize_kernel<scalar_t, decltype(kc)::value>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                     tab.const_data_ptr<float>(), k, x.numel());
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, ConstraintPassOp, constraint_pass_cpu);
  CBP_IMPL(m, ConstraintQuantizeOp, constraint_quantize_cpu);
  CBP_IMPL(m, ConstraintMultiplierStepOp, constraint_multiplier_step_cpu);
}

}  // namespace cbp
