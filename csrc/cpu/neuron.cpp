// Multi-step spiking neuron on the CPU: forward and surrogate backward over all T
// timesteps in one call each. x_seq is [T, N] (contiguous, N = all trailing dims); each
// OpenMP thread owns a block of columns and walks time inside the block, so the state
// V stays in a small local buffer (cache) and the inner loop over columns vectorizes.
// The forward writes only S (and V[T-1]); the backward recomputes the block's H[0..T-1] from
// X into a cache-resident buffer before its reverse time loop, so a training step streams
// X, S, dL/dS and dL/dX (4 [T, N] tensors, 5 passes) instead of also writing and reading H
// and reading S back (7 passes). H is returned empty. Equations: csrc/common/neuron_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/neuron_math.h"

namespace cbp {
namespace {

// Columns per work item. Each time step streams one contiguous run of kBlock columns of every
// [T, N] tensor, so the hardware prefetchers see a few long streams rather than 3T short ones;
// the block's state arrays (64 KiB each) stay in L2. Measured (bench/bench_neuron.py, fwd+bwd
// of [32, 2**20], one thread on a shared 2-core AVX-512 Xeon, best of 7): 512 columns 460 ms
// in both runs, 16384 columns 290-300 ms in three runs of four (517 ms in the other).
constexpr int64_t kBlock = 16384;
// The backward's block holds H of all T steps: at most kRecomputeFloats floats (1 MiB, in L2).
constexpr int64_t kRecomputeFloats = 1 << 18;

int64_t backward_block_size(int64_t T) { return std::max<int64_t>(64, std::min(kBlock, kRecomputeFloats / T)); }

NeuronParams make_params(double v_threshold, double v_reset, bool soft_reset, int64_t kind,
                         bool decay_input, bool detach_reset, int64_t surrogate, double alpha) {
  return NeuronParams{static_cast<float>(v_threshold), soft_reset ? 0.0f : static_cast<float>(v_reset),
                      static_cast<int>(kind), soft_reset, decay_input, detach_reset,
                      static_cast<int>(surrogate), static_cast<float>(alpha)};
}

// The kernels' bodies are written once (always_inline) and instantiated twice: portable, and
// for AVX-512 (target attribute, chosen at run time), where the column loops become 16-wide.
// The surrogate is a template argument so the backward's column loop has no switch in it;
// the NeuronParams copy `q` is local, so its fields are loop-invariant (no aliasing with the
// outputs) and the remaining flags become selects. -ffp-contract=off holds in both builds
// (no FMA), so the spikes stay bitwise equal to the reference.
#define CBP_ALWAYS_INLINE inline __attribute__((always_inline))
#define CBP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))

// True when the CPU has AVX-512 and CBP_KERNELS_NO_AVX512 is unset (set, it tests the portable path).
bool use_avx512() {
  static const bool use = std::getenv("CBP_KERNELS_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return use;
}

// One block of `len` columns, all T steps: H = charge(V, X); S = (H - V_th >= 0); V = reset(H, S).
template <typename scalar_t>
CBP_ALWAYS_INLINE void forward_block(const scalar_t* __restrict__ x, const float* __restrict__ v_init, float k,
                                     const NeuronParams& p, scalar_t* __restrict__ spike,
                                     float* __restrict__ v_last, int64_t T, int64_t N, int64_t start, int64_t len,
                                     float* __restrict__ v) {
  const NeuronParams q = p;
  std::copy(v_init + start, v_init + start + len, v);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * N + start;
    for (int64_t i = 0; i < len; ++i) {
      const float h = neuron_charge(v[i], static_cast<float>(x[row + i]), k, q);
      const float s = (h - q.v_threshold >= 0.0f) ? 1.0f : 0.0f;
      spike[row + i] = static_cast<scalar_t>(s);
      v[i] = neuron_reset(h, s, q);
    }
  }
  std::copy(v, v + len, v_last + start);
}

// One block, reverse time: gH = gS sg'(H - V_th) + gV dV/dH; gX = gH dH/dX; gV[t-1] = gH dH/dV.
// First H[t] of the block's columns is recomputed from X and v_init (the forward's equations,
// same arithmetic, so S = (H - V_th >= 0) is the forward's spike bit for bit) into h[t * len + i].
// PLIF (kGradK): returns sum over the block's columns and t of gH dH/dk, with V[t-1] =
// reset(H[t-1], S[t-1]) (v_init at t = 0); per-column float sums, added up in double at the end.
template <typename scalar_t, int kSurrogate, bool kGradK>
CBP_ALWAYS_INLINE double backward_block(const scalar_t* __restrict__ grad_spike, const float* __restrict__ grad_v_last,
                                        const scalar_t* __restrict__ x, const float* __restrict__ v_init, float k,
                                        const NeuronParams& p, scalar_t* __restrict__ grad_x,
                                        float* __restrict__ grad_v_init, int64_t T, int64_t N, int64_t start,
                                        int64_t len, float* __restrict__ scratch) {
  const NeuronParams q = p;
  const float dh_dv = charge_dh_dv(k, q);
  const float dh_dx = charge_dh_dx(k, q);
  float* __restrict__ h = scratch;  // (T + 3) * len floats: h [T][len], gv, gk, dk
  float* __restrict__ gv = h + T * len;
  float* __restrict__ gk = gv + len;
  float* __restrict__ dk = gk + len;
  std::copy(v_init + start, v_init + start + len, gv);  // gv holds V while H is recomputed
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + start;
    float* __restrict__ hr = h + t * len;
    for (int64_t i = 0; i < len; ++i) {
      hr[i] = neuron_charge(gv[i], static_cast<float>(xr[i]), k, q);
      gv[i] = neuron_reset(hr[i], (hr[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f, q);
    }
  }
  std::copy(grad_v_last + start, grad_v_last + start + len, gv);
  std::fill(gk, gk + len, 0.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t row = t * N + start;
    const float* __restrict__ hr = h + t * len;
    if (kGradK) {  // dk = dH[t]/dk; branches outside the column loops keep them vectorizable
      if (t > 0) {
        const float* __restrict__ hp = hr - len;
        for (int64_t i = 0; i < len; ++i) dk[i] = neuron_reset(hp[i], (hp[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f, q);
      } else {
        std::copy(v_init + start, v_init + start + len, dk);
      }
      if (q.decay_input) {
        for (int64_t i = 0; i < len; ++i) dk[i] = charge_dh_dk(dk[i], static_cast<float>(x[row + i]), q);
      } else {
        for (int64_t i = 0; i < len; ++i) dk[i] = charge_dh_dk(dk[i], 0.0f, q);
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      const float s = (hr[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f;
      const float sg = surrogate_grad(hr[i] - q.v_threshold, kSurrogate, q.alpha);
      const float gh = static_cast<float>(grad_spike[row + i]) * sg + gv[i] * reset_dv_dh(hr[i], s, sg, q);
      grad_x[row + i] = static_cast<scalar_t>(gh * dh_dx);
      if (kGradK) gk[i] += gh * dk[i];
      gv[i] = gh * dh_dv;
    }
  }
  std::copy(gv, gv + len, grad_v_init + start);
  double sum = 0.0;
  if (kGradK) {
    for (int64_t i = 0; i < len; ++i) sum += gk[i];
  }
  return sum;
}

// The OpenMP loops over column blocks, one per instruction set.
#define CBP_NEURON_LOOPS(ATTR, SUFFIX)                                                                           \
  template <typename scalar_t>                                                                                  \
  ATTR void forward_##SUFFIX(const scalar_t* x, const float* v_init, float k, const NeuronParams& p,            \
                             scalar_t* spike, float* v_last, int64_t T, int64_t N) {                            \
    _Pragma("omp parallel") {                                                                                   \
      std::vector<float> v(kBlock); /* the block's state V, one per thread and call */                          \
      _Pragma("omp for schedule(static)") for (int64_t start = 0; start < N; start += kBlock) {                 \
        forward_block(x, v_init, k, p, spike, v_last, T, N, start, std::min(kBlock, N - start), v.data());      \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  template <typename scalar_t, int kSurrogate, bool kGradK>                                                     \
  ATTR void backward_##SUFFIX(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x,          \
                              const float* v_init, float k, const NeuronParams& p, scalar_t* grad_x,            \
                              float* grad_v_init, double* partial, int64_t T, int64_t N) {                      \
    const int64_t block = backward_block_size(T), blocks = (N + block - 1) / block;                             \
    _Pragma("omp parallel") {                                                                                   \
      std::vector<float> scratch((T + 3) * block); /* one per thread and call, not per block */                 \
      _Pragma("omp for schedule(static)") for (int64_t b = 0; b < blocks; ++b) {                                \
        const int64_t start = b * block;                                                                        \
        partial[b] = backward_block<scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p,     \
                                                                  grad_x, grad_v_init, T, N, start,             \
                                                                  std::min(block, N - start), scratch.data());  \
      }                                                                                                         \
    }                                                                                                           \
  }

CBP_NEURON_LOOPS(, portable)
CBP_NEURON_LOOPS(CBP_AVX512, avx512)
#undef CBP_NEURON_LOOPS

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const float* v_init, float k, const NeuronParams& p, scalar_t* spike,
                    float* v_last, int64_t T, int64_t N) {
  if (use_avx512()) {
    forward_avx512(x, v_init, k, p, spike, v_last, T, N);
  } else {
    forward_portable(x, v_init, k, p, spike, v_last, T, N);
  }
}

template <typename scalar_t, int kSurrogate, bool kGradK>
void backward_isa(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x, const float* v_init,
                  float k, const NeuronParams& p, scalar_t* grad_x, float* grad_v_init, double* partial, int64_t T,
                  int64_t N) {
  if (use_avx512()) {
    backward_avx512<scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                  partial, T, N);
  } else {
    backward_portable<scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                    partial, T, N);
  }
}

// The run-time surrogate and need_grad_k become template arguments here, once per call.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x, const float* v_init,
                     float k, const NeuronParams& p, bool need_grad_k, scalar_t* grad_x, float* grad_v_init,
                     double* partial, int64_t T, int64_t N) {
  auto with_surrogate = [&](auto surrogate) {
    constexpr int kSurrogate = decltype(surrogate)::value;
    if (need_grad_k) {
      backward_isa<scalar_t, kSurrogate, true>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                               partial, T, N);
    } else {
      backward_isa<scalar_t, kSurrogate, false>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                partial, T, N);
    }
  };
  switch (p.surrogate) {
    case kATan: return with_surrogate(std::integral_constant<int, kATan>{});
    case kSigmoid: return with_surrogate(std::integral_constant<int, kSigmoid>{});
    case kRectangle: return with_surrogate(std::integral_constant<int, kRectangle>{});
    case kTriangle: return with_surrogate(std::integral_constant<int, kTriangle>{});
    default: return with_surrogate(std::integral_constant<int, kPiecewiseQuadratic>{});
  }
}

// Returns {S, V[T-1], H}; H is empty: the backward recomputes it from X (see the top).
std::vector<at::Tensor> neuron_forward(const at::Tensor& x_seq, const at::Tensor& v_init,
                                       const at::Tensor& decay, double v_threshold, double v_reset,
                                       bool soft_reset, int64_t kind, bool decay_input) {
  const auto p = make_params(v_threshold, v_reset, soft_reset, kind, decay_input, false, 0, 1.0);
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto x = x_seq.contiguous();
  auto v0 = v_init.contiguous();
  auto spike = at::empty_like(x);
  auto v_last = at::empty_like(v0);
  const float k = decay.item<float>();
  AT_DISPATCH_V2(x.scalar_type(), "neuron_forward_cpu", AT_WRAP([&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), v0.data_ptr<float>(), k, p, spike.data_ptr<scalar_t>(),
                             v_last.data_ptr<float>(), T, N);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {spike, v_last, x.new_empty({0})};
}

// h_seq and spike_seq are not read (the forward saved neither H nor needs S: both are
// recomputed from x_seq, which must be the forward's input).
std::vector<at::Tensor> neuron_backward(const at::Tensor& grad_spike, const at::Tensor& grad_v_last,
                                        const at::Tensor& h_seq, const at::Tensor& spike_seq,
                                        const at::Tensor& x_seq, const at::Tensor& v_init,
                                        const at::Tensor& decay, double v_threshold, double v_reset,
                                        bool soft_reset, int64_t kind, bool decay_input, bool detach_reset,
                                        int64_t surrogate, double alpha, bool need_grad_decay) {
  TORCH_CHECK(x_seq.sizes() == grad_spike.sizes(), "neuron_backward (cpu) recomputes H from x_seq: it must be the "
              "forward's input [T, *], got shape ", x_seq.sizes(), " for grad_spike ", grad_spike.sizes());
  const auto p = make_params(v_threshold, v_reset, soft_reset, kind, decay_input, detach_reset, surrogate, alpha);
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto gs = grad_spike.contiguous();
  auto gvl = grad_v_last.contiguous();
  auto x = x_seq.contiguous();
  auto v0 = v_init.contiguous();
  auto grad_x = at::empty_like(x);
  auto grad_v_init = at::empty_like(v0);
  const int64_t block = backward_block_size(T);
  auto partial = at::zeros({(N + block - 1) / block}, x.options().dtype(at::kDouble));
  const float k = decay.item<float>();
  AT_DISPATCH_V2(x.scalar_type(), "neuron_backward_cpu", AT_WRAP([&] {
    backward_kernel<scalar_t>(gs.data_ptr<scalar_t>(), gvl.data_ptr<float>(), x.data_ptr<scalar_t>(),
                              v0.data_ptr<float>(), k, p, need_grad_decay, grad_x.data_ptr<scalar_t>(),
                              grad_v_init.data_ptr<float>(), partial.data_ptr<double>(), T, N);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  auto grad_decay = partial.sum().to(at::kFloat);
  return {grad_x, grad_v_init, grad_decay};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext, m) {
  m.def(
      "neuron_forward(Tensor x_seq, Tensor v_init, Tensor decay, float v_threshold, float v_reset, "
      "bool soft_reset, int kind, bool decay_input) -> Tensor[]");
  m.def(
      "neuron_backward(Tensor grad_spike, Tensor grad_v_last, Tensor h_seq, Tensor spike_seq, Tensor x_seq, "
      "Tensor v_init, Tensor decay, float v_threshold, float v_reset, bool soft_reset, int kind, "
      "bool decay_input, bool detach_reset, int surrogate, float alpha, bool need_grad_decay) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  m.impl("neuron_forward", &neuron_forward);
  m.impl("neuron_backward", &neuron_backward);
}

}  // namespace cbp
