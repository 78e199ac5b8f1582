// Multi-step spiking neuron on the CPU: forward and surrogate backward over all T
// timesteps in one call each. x_seq is [T, N] (contiguous, N = all trailing dims); each
// OpenMP thread owns a block of columns and walks time inside the block, so the state
// V stays in a small local buffer (cache) and the inner loop over columns vectorizes.
// Equations: csrc/common/neuron_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/neuron_math.h"

namespace cbp {
namespace {

// Columns per work item: 2 KiB of float32 state per array, well inside L1.
constexpr int64_t kBlock = 512;

NeuronParams make_params(double v_threshold, double v_reset, bool soft_reset, int64_t kind,
                         bool decay_input, bool detach_reset, int64_t surrogate, double alpha) {
  return NeuronParams{static_cast<float>(v_threshold), soft_reset ? 0.0f : static_cast<float>(v_reset),
                      static_cast<int>(kind), soft_reset, decay_input, detach_reset,
                      static_cast<int>(surrogate), static_cast<float>(alpha)};
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const float* v_init, float k, const NeuronParams& p,
                    scalar_t* spike, float* v_last, scalar_t* h_seq, int64_t T, int64_t N) {
#pragma omp parallel for schedule(static)
  for (int64_t start = 0; start < N; start += kBlock) {
    const int64_t len = std::min(kBlock, N - start);
    float v[kBlock];
    std::copy(v_init + start, v_init + start + len, v);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = t * N + start;
      for (int64_t i = 0; i < len; ++i) {
        const float h = neuron_charge(v[i], static_cast<float>(x[row + i]), k, p);
        const float s = (h - p.v_threshold >= 0.0f) ? 1.0f : 0.0f;
        h_seq[row + i] = static_cast<scalar_t>(h);
        spike[row + i] = static_cast<scalar_t>(s);
        v[i] = neuron_reset(h, s, p);
      }
    }
    std::copy(v, v + len, v_last + start);
  }
}

// Reverse time loop: grad_H = grad_S * sg' + grad_V * dV/dH; grad_X = grad_H * dH/dX;
// grad_V[t-1] = grad_H * dH/dV; grad_k += grad_H * dH/dk (needs V[t-1], rebuilt from H[t-1]).
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* h_seq,
                     const scalar_t* spike, const scalar_t* x, const float* v_init, float k,
                     const NeuronParams& p, bool need_grad_k, scalar_t* grad_x, float* grad_v_init,
                     double* grad_k_partial, int64_t T, int64_t N) {
  const float dh_dv = charge_dh_dv(k, p);
  const float dh_dx = charge_dh_dx(k, p);
  const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, N - start);
    float gv[kBlock];
    std::copy(grad_v_last + start, grad_v_last + start + len, gv);
    double gk = 0.0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t row = t * N + start;
      for (int64_t i = 0; i < len; ++i) {
        const float h = static_cast<float>(h_seq[row + i]);
        const float s = static_cast<float>(spike[row + i]);
        const float sg = surrogate_grad(h - p.v_threshold, p.surrogate, p.alpha);
        const float gh = static_cast<float>(grad_spike[row + i]) * sg + gv[i] * reset_dv_dh(h, s, sg, p);
        grad_x[row + i] = static_cast<scalar_t>(gh * dh_dx);
        if (need_grad_k) {
          float v_prev;
          if (t == 0) {
            v_prev = v_init[start + i];
          } else {
            const int64_t prev = row - N + i;
            v_prev = neuron_reset(static_cast<float>(h_seq[prev]), static_cast<float>(spike[prev]), p);
          }
          gk += gh * charge_dh_dk(v_prev, static_cast<float>(x[row + i]), p);
        }
        gv[i] = gh * dh_dv;
      }
    }
    std::copy(gv, gv + len, grad_v_init + start);
    grad_k_partial[b] = gk;
  }
}

std::vector<at::Tensor> neuron_forward(const at::Tensor& x_seq, const at::Tensor& v_init,
                                       const at::Tensor& decay, double v_threshold, double v_reset,
                                       bool soft_reset, int64_t kind, bool decay_input) {
  const auto p = make_params(v_threshold, v_reset, soft_reset, kind, decay_input, false, 0, 1.0);
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto x = x_seq.contiguous();
  auto v0 = v_init.contiguous();
  auto spike = at::empty_like(x);
  auto h_seq = at::empty_like(x);
  auto v_last = at::empty_like(v0);
  const float k = decay.item<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "neuron_forward_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), v0.data_ptr<float>(), k, p, spike.data_ptr<scalar_t>(),
                             v_last.data_ptr<float>(), h_seq.data_ptr<scalar_t>(), T, N);
  });
  return {spike, v_last, h_seq};
}

std::vector<at::Tensor> neuron_backward(const at::Tensor& grad_spike, const at::Tensor& grad_v_last,
                                        const at::Tensor& h_seq, const at::Tensor& spike_seq,
                                        const at::Tensor& x_seq, const at::Tensor& v_init,
                                        const at::Tensor& decay, double v_threshold, double v_reset,
                                        bool soft_reset, int64_t kind, bool decay_input, bool detach_reset,
                                        int64_t surrogate, double alpha, bool need_grad_decay) {
  const auto p = make_params(v_threshold, v_reset, soft_reset, kind, decay_input, detach_reset, surrogate, alpha);
  const int64_t T = h_seq.size(0);
  const int64_t N = h_seq.numel() / T;
  auto gs = grad_spike.contiguous();
  auto gvl = grad_v_last.contiguous();
  auto h = h_seq.contiguous();
  auto s = spike_seq.contiguous();
  auto x = x_seq.contiguous();
  auto v0 = v_init.contiguous();
  auto grad_x = at::empty_like(h);
  auto grad_v_init = at::empty_like(v0);
  auto partial = at::zeros({(N + kBlock - 1) / kBlock}, h.options().dtype(at::kDouble));
  const float k = decay.item<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "neuron_backward_cpu", [&] {
    backward_kernel<scalar_t>(gs.data_ptr<scalar_t>(), gvl.data_ptr<float>(), h.data_ptr<scalar_t>(),
                              s.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v0.data_ptr<float>(), k, p,
                              need_grad_decay, grad_x.data_ptr<scalar_t>(), grad_v_init.data_ptr<float>(),
                              partial.data_ptr<double>(), T, N);
  });
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
