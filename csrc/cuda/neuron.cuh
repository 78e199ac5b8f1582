// Multi-step spiking neuron on CUDA: extern "C" kernels with no torch includes, so that the
// extension (csrc/cuda/neuron.cu) and CuPy's NVRTC (cbp_kernels/ops/neuron/cupy.py) compile
// the same source. One thread per column of the [T, N] input, the time loop inside the
// thread, the membrane state in a register. Equations: csrc/common/neuron_math.h, float32
// whatever the storage dtype; compile with --fmad=false so the spikes are bitwise the
// reference's.
//
// Kernels, for SUFFIX / storage type  f32 / float,  f16 / __half,  bf16 / __nv_bfloat16:
//   neuron_forward_SUFFIX(x, v_init, decay, spike, v_last, h_seq, T, N, v_threshold, v_reset,
//                         kind, soft_reset, decay_input)
//   neuron_backward_SUFFIX(grad_spike, grad_v_last, h_seq, spike, x, v_init, decay, grad_x,
//                          grad_v_init, partial, T, N, v_threshold, v_reset, kind,
//                          soft_reset, decay_input, detach_reset, surrogate, alpha, need_grad_decay)
// x, spike, h_seq, grad_spike, grad_x: [T, N] contiguous storage type; v_init, v_last,
// grad_v_last, grad_v_init: [N] float, each may be null (v_init = v_reset and grad_v_last = 0
// in every column, grad_v_init not written: the op's defaults, no [N] tensor); decay: one float
// (k = 1/tau, read on the device); partial: double [gridDim.x], written only when
// need_grad_decay: block b's sum of PLIF's dL/dk (the caller adds the partials up in float64
// and rounds once to float32; no atomics, so the result does not depend on the schedule).
// Launch with kNeuronThreads threads per block and ceil(N / kNeuronThreads) blocks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/neuron_math.h"
#include "cuda/storage.cuh"

namespace cbp {

// Threads per block; a multiple of 32 (the backward's warp reduction assumes whole warps).
constexpr int kNeuronThreads = 256;

// For t = 0..T-1: H[t] = charge(V[t-1], X[t]); S[t] = (H[t] - V_th >= 0); V[t] = reset(H[t], S[t]).
template <typename scalar_t>
__device__ __forceinline__ void neuron_forward_impl(const scalar_t* __restrict__ x, const float* __restrict__ v_init,
                                                    const float* __restrict__ decay, scalar_t* __restrict__ spike,
                                                    float* __restrict__ v_last, scalar_t* __restrict__ h_seq,
                                                    long long T, long long N, const NeuronParams& p) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const float k = *decay;
  float v = v_init != nullptr ? v_init[i] : p.v_reset;
  for (long long idx = i; idx < T * N; idx += N) {
    const float h = neuron_charge(v, load_f32(x + idx), k, p);
    const float s = (h - p.v_threshold >= 0.0f) ? 1.0f : 0.0f;
    store_f32(h_seq + idx, h);
    store_f32(spike + idx, s);
    v = neuron_reset(h, s, p);
  }
  v_last[i] = v;
}

// Sum of v over the block in float64, valid in thread 0 (every thread of the block must call
// it): a fixed tree, lanes by shuffles, then the warps' sums in warp 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kNeuronThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Reverse time loop: gH = gS sg'(H - V_th) + gV dV/dH; gX = gH dH/dX; gV[t-1] = gH dH/dV;
// PLIF: partial[block] = sum over the block's columns of (float32 sum over t = T-1..0 of
// gH dH/dk) in float64 (V[t-1] rebuilt from H[t-1], S[t-1]): the CPU kernel's per-column sums
// (csrc/cpu/neuron.cpp), added up in float64 in another order.
template <typename scalar_t>
__device__ __forceinline__ void neuron_backward_impl(
    const scalar_t* __restrict__ grad_spike, const float* __restrict__ grad_v_last, const scalar_t* __restrict__ h_seq,
    const scalar_t* __restrict__ spike, const scalar_t* __restrict__ x, const float* __restrict__ v_init,
    const float* __restrict__ decay, scalar_t* __restrict__ grad_x, float* __restrict__ grad_v_init,
    double* __restrict__ partial, long long T, long long N, const NeuronParams& p, bool need_grad_decay) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < N;  // no early return: the whole block joins the reduction
  const float k = *decay;
  const float dh_dv = charge_dh_dv(k, p);
  const float dh_dx = charge_dh_dx(k, p);
  float gk = 0.0f;
  if (active) {
    float gv = grad_v_last != nullptr ? grad_v_last[i] : 0.0f;
    long long idx = (T - 1) * N + i;
    float h = load_f32(h_seq + idx), s = load_f32(spike + idx);
    for (; idx >= 0; idx -= N) {
      // H[t-1], S[t-1]: V[t-1] for dH/dk now, this thread's H and S at the next (earlier) step.
      const bool has_prev = idx >= N;
      const float h_prev = has_prev ? load_f32(h_seq + idx - N) : 0.0f;
      const float s_prev = has_prev ? load_f32(spike + idx - N) : 0.0f;
      const float sg = surrogate_grad(h - p.v_threshold, p.surrogate, p.alpha);
      const float gh = load_f32(grad_spike + idx) * sg + gv * reset_dv_dh(h, s, sg, p);
      store_f32(grad_x + idx, gh * dh_dx);
      if (need_grad_decay) {
        const float v_prev = has_prev ? neuron_reset(h_prev, s_prev, p) : (v_init != nullptr ? v_init[i] : p.v_reset);
        gk += gh * charge_dh_dk(v_prev, p.decay_input ? load_f32(x + idx) : 0.0f, p);
      }
      gv = gh * dh_dv;
      h = h_prev;
      s = s_prev;
    }
    if (grad_v_init != nullptr) grad_v_init[i] = gv;
  }
  if (need_grad_decay) {
    const double sum = block_sum(static_cast<double>(gk));
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
  }
}

}  // namespace cbp

#define CBP_NEURON_KERNELS(SUFFIX, scalar_t)                                                                       \
  extern "C" __global__ void __launch_bounds__(cbp::kNeuronThreads) neuron_forward_##SUFFIX(                       \
      const scalar_t* x, const float* v_init, const float* decay, scalar_t* spike, float* v_last, scalar_t* h_seq, \
      long long T, long long N, float v_threshold, float v_reset, int kind, int soft_reset, int decay_input) {     \
    cbp::neuron_forward_impl<scalar_t>(x, v_init, decay, spike, v_last, h_seq, T, N,                               \
                                       cbp::neuron_params(v_threshold, v_reset, kind, soft_reset, decay_input, 0,  \
                                                          0, 1.0f));                                               \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(cbp::kNeuronThreads) neuron_backward_##SUFFIX(                      \
      const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* h_seq, const scalar_t* spike,          \
      const scalar_t* x, const float* v_init, const float* decay, scalar_t* grad_x, float* grad_v_init,            \
      double* partial, long long T, long long N, float v_threshold, float v_reset, int kind, int soft_reset,      \
      int decay_input, int detach_reset, int surrogate, float alpha, int need_grad_decay) {                        \
    cbp::neuron_backward_impl<scalar_t>(                                                                           \
        grad_spike, grad_v_last, h_seq, spike, x, v_init, decay, grad_x, grad_v_init, partial, T, N,               \
        cbp::neuron_params(v_threshold, v_reset, kind, soft_reset, decay_input, detach_reset, surrogate, alpha),   \
        need_grad_decay != 0);                                                                                     \
  }

CBP_NEURON_KERNELS(f32, float)
CBP_NEURON_KERNELS(f16, __half)
CBP_NEURON_KERNELS(bf16, __nv_bfloat16)

#undef CBP_NEURON_KERNELS
