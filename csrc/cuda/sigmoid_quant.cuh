// CUDA kernels of the sigmoid-sum quantizer (equations: csrc/common/sigmoid_quant_math.h).
// extern "C" and free of torch includes, so CuPy (NVRTC) compiles this file as it is.
// One thread per weight. The backward writes grad_w and, per block b, the block's sums of
// alpha's and beta's gradient terms in float64 to partial[2b] and partial[2b + 1] (a fixed
// tree in shared memory); the caller adds the partials up in float64 (no atomics: the result
// does not depend on the schedule) and rounds once to float32, as the CPU kernel's float64 sums.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/sigmoid_quant_math.h"
#include "cuda/storage.cuh"

namespace cbp {

// The level table lives in device memory: gaps s_i and midpoints b_i, [n] float32 each
// (plain pointers, so CuPy passes them as it passes any array).
template <typename scalar_t>
__device__ void sigmoid_quant_forward_impl(const scalar_t* w, scalar_t* y, long long n, const float* alpha,
                                           const float* beta, float temperature, const float* gaps,
                                           const float* mids, int n_sig, float offset) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const SigmoidSum r = sigmoid_sum(load_f32(w + i), *beta, temperature, gaps, mids, n_sig, offset);
  store_f32(y + i, *alpha * r.value);
}

constexpr int kSigmoidQuantThreads = 256;  // the block size the backward's tree assumes

template <typename scalar_t>
__device__ void sigmoid_quant_backward_impl(const scalar_t* gy, const scalar_t* w, scalar_t* gw, double* partial,
                                            long long n, const float* alpha, const float* beta, float temperature,
                                            const float* gaps, const float* mids, int n_sig, float offset) {
  __shared__ double part_a[kSigmoidQuantThreads], part_b[kSigmoidQuantThreads];
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  float pa = 0.0f, pb = 0.0f;  // this weight's terms, rounded to float32 as on the CPU
  if (i < n) {
    const float a = *alpha, b = *beta;
    const float wi = load_f32(w + i), gi = load_f32(gy + i);
    const SigmoidSum r = sigmoid_sum(wi, b, temperature, gaps, mids, n_sig, offset);
    store_f32(gw + i, gi * a * b * temperature * r.slope);
    pa = gi * r.value;
    pb = gi * a * wi * temperature * r.slope;
  }
  part_a[threadIdx.x] = pa;
  part_b[threadIdx.x] = pb;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      part_a[threadIdx.x] += part_a[threadIdx.x + s];
      part_b[threadIdx.x] += part_b[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = part_a[0];
    partial[2 * blockIdx.x + 1] = part_b[0];
  }
}

}  // namespace cbp

// Launch with kSigmoidQuantThreads threads per block (the backward's tree assumes it).
#define CBP_SIGMOID_QUANT_KERNELS(suffix, scalar_t)                                                             \
  extern "C" __global__ void sigmoid_quant_forward_##suffix(const scalar_t* w, scalar_t* y, long long n,         \
                                                            const float* alpha, const float* beta,             \
                                                            float temperature, const float* gaps,              \
                                                            const float* mids, int n_sig, float offset) {      \
    cbp::sigmoid_quant_forward_impl<scalar_t>(w, y, n, alpha, beta, temperature, gaps, mids, n_sig, offset);    \
  }                                                                                                             \
  extern "C" __global__ void sigmoid_quant_backward_##suffix(                                                   \
      const scalar_t* gy, const scalar_t* w, scalar_t* gw, double* partial, long long n, const float* alpha,     \
      const float* beta, float temperature, const float* gaps, const float* mids, int n_sig, float offset) {    \
    cbp::sigmoid_quant_backward_impl<scalar_t>(gy, w, gw, partial, n, alpha, beta, temperature, gaps, mids,     \
                                               n_sig, offset);                                                  \
  }

CBP_SIGMOID_QUANT_KERNELS(f32, float)
CBP_SIGMOID_QUANT_KERNELS(f16, __half)
CBP_SIGMOID_QUANT_KERNELS(bf16, __nv_bfloat16)
