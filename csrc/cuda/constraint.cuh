// The CBP constraint on CUDA: extern "C" kernels with no torch includes, so that the
// extension (csrc/cuda/constraint.cu) and CuPy's NVRTC (cbp_kernels/ops/constraint/cupy.py)
// compile the same source. Math: csrc/common/constraint_math.h (float32 whatever the storage
// dtype); spec: cbp_kernels/ops/constraint/reference.py. Compile with --fmad=false so that
// grad + lam * dcs/dw rounds exactly as the reference.
//
// constraint_pass_SUFFIX(meta, n_layers, table, k, partial)
//   ONE launch for all L = n_layers layers, one block per chunk (gridDim.x = C chunks). meta
//   is one int64 launch table (built by csrc/cuda/constraint.cu and, for the cupy backend,
//   cbp_kernels/ops/constraint/_chunks.py):
//     [ numel[L] | w[L] | lambda[L] | grad[L] | lambda_grad[L] | chunk_layer[C] | chunk_start[C] ]
//   (base addresses of storage-type arrays; grad / lambda_grad 0 when not wanted); block b
//   handles the kConstraintChunk weights of layer chunk_layer[b] from chunk_start[b]; table
//   holds the [L][4][k] float constants. Per weight w, multiplier lam:  sum lam*cs(w; g),
//   sum cs(w) (block partials, float64, into partial[2b], partial[2b+1]);
//   grad += lam * dcs/dw;  lambda_grad = cs(w; g).
// constraint_multiplier_step_SUFFIX(meta, n_layers, table, k, scalars)
//   The same launch table and chunks, with the exp_avg and exp_avg_sq base addresses in the
//   grad and lambda_grad columns: [ numel | w | lambda | exp_avg | exp_avg_sq | chunks ]. Per
//   weight: c = cs(w; g), then one gradient-ascent Adam / AdamW step of lambda on c
//   (multiplier_adam of csrc/common/constraint_math.h; lambda, m, v in place), with the 8
//   float step scalars of reference.adam_scalars in device memory.
// constraint_quantize_SUFFIX(w, out, table, k, n): out = Q(w) for one layer's table row.
// SUFFIX / storage type: f32 / float, f16 / __half, bf16 / __nv_bfloat16. Launch with
// kConstraintThreads threads and 4*k floats of dynamic shared memory (the table row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/constraint_math.h"
#include "cuda/storage.cuh"

namespace cbp {

constexpr int kConstraintThreads = 256;  // a multiple of 32 (warp reduction)
// Weights per block: 16 per thread keeps enough loads in flight for a memory-bound pass and
// makes the partial-sum table 4096x smaller than the weights (not tuned on a GPU yet).
constexpr long long kConstraintChunk = 4096;


// Copies the table row (4*k floats) into shared memory; every thread reads it per weight.
__device__ __forceinline__ const float* constraint_shared_row(const float* __restrict__ row, int k) {
  CBP_DYNAMIC_SHARED(float, shared_row);
  for (int i = threadIdx.x; i < kConstraintRows * k; i += blockDim.x) shared_row[i] = row[i];
  __syncthreads();
  return shared_row;
}

__device__ __forceinline__ float constraint_block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? scratch[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();
  return v;  // valid in thread 0
}

// This block's chunk of the launch table: its layer and the weights [start, end).
struct ConstraintChunk {
  long long layer, start, end;
};
__device__ __forceinline__ ConstraintChunk constraint_chunk(const long long* __restrict__ meta, long long L) {
  const long long layer = meta[5 * L + blockIdx.x];
  const long long start = meta[5 * L + gridDim.x + blockIdx.x];
  const long long n = meta[layer];
  return {layer, start, start + kConstraintChunk < n ? start + kConstraintChunk : n};
}

template <typename scalar_t>
__device__ __forceinline__ void constraint_pass_impl(const long long* __restrict__ meta, int n_layers,
                                                     const float* __restrict__ table, int k,
                                                     double* __restrict__ partial) {
  __shared__ float scratch[kConstraintThreads / 32];
  const long long L = n_layers;
  const ConstraintChunk ch = constraint_chunk(meta, L);
  const long long layer = ch.layer;
  const float* row = constraint_shared_row(table + layer * kConstraintRows * k, k);
  const scalar_t* w = reinterpret_cast<const scalar_t*>(meta[L + layer]);
  const scalar_t* lam = reinterpret_cast<const scalar_t*>(meta[2 * L + layer]);
  scalar_t* grad = reinterpret_cast<scalar_t*>(meta[3 * L + layer]);     // null: not wanted
  scalar_t* lgrad = reinterpret_cast<scalar_t*>(meta[4 * L + layer]);
  float sum_l = 0.0f, sum_f = 0.0f;
  // No `#pragma unroll 4` here: with it ptxas spilled 8 bytes per thread to local memory
  // (f16 / bf16 on sm_80 and sm_90, f32 on sm_90); without it 40 registers, no local memory.
  for (long long i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
    const float x = load_f32(w + i);
    const float l = load_f32(lam + i);
    float keep;
    const float q = constraint_select(x, row, k, &keep);
    const float free = constraint_free(x, q);
    const float c = free * keep;
    sum_l += l * c;
    sum_f += free;
    if (grad) store_f32(grad + i, load_f32(grad + i) + l * constraint_slope(x, q, keep));
    if (lgrad) store_f32(lgrad + i, c);
  }
  sum_l = constraint_block_sum(sum_l, scratch);
  sum_f = constraint_block_sum(sum_f, scratch);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = static_cast<double>(sum_l);
    partial[2 * blockIdx.x + 1] = static_cast<double>(sum_f);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void constraint_multiplier_step_impl(const long long* __restrict__ meta, int n_layers,
                                                                const float* __restrict__ table, int k,
                                                                const float* __restrict__ scalars) {
  const long long L = n_layers;
  const ConstraintChunk ch = constraint_chunk(meta, L);
  const float* row = constraint_shared_row(table + ch.layer * kConstraintRows * k, k);
  float h[kMultiplierScalars];
#pragma unroll
  for (int j = 0; j < kMultiplierScalars; ++j) h[j] = scalars[j];
  const scalar_t* w = reinterpret_cast<const scalar_t*>(meta[L + ch.layer]);
  scalar_t* lam = reinterpret_cast<scalar_t*>(meta[2 * L + ch.layer]);
  scalar_t* m = reinterpret_cast<scalar_t*>(meta[3 * L + ch.layer]);
  scalar_t* v = reinterpret_cast<scalar_t*>(meta[4 * L + ch.layer]);
#pragma unroll 4
  for (long long i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
    const float x = load_f32(w + i);
    float keep;
    const float q = constraint_select(x, row, k, &keep);
    const MultiplierState out =
        multiplier_adam(constraint_free(x, q) * keep, h, {load_f32(lam + i), load_f32(m + i), load_f32(v + i)});
    store_f32(lam + i, out.lam);
    store_f32(m + i, out.m);
    store_f32(v + i, out.v);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void constraint_quantize_impl(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                                         const float* __restrict__ table, int k, long long n) {
  const float* row = constraint_shared_row(table, k);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    float keep;
    store_f32(out + i, constraint_select(load_f32(w + i), row, k, &keep));
  }
}

}  // namespace cbp

#define CBP_CONSTRAINT_KERNELS(SUFFIX, TYPE)                                                                   \
  extern "C" __global__ void __launch_bounds__(cbp::kConstraintThreads) constraint_pass_##SUFFIX(              \
      const long long* meta, int n_layers, const float* table, int k, double* partial) {                       \
    cbp::constraint_pass_impl<TYPE>(meta, n_layers, table, k, partial);                                        \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(cbp::kConstraintThreads) constraint_quantize_##SUFFIX(          \
      const TYPE* w, TYPE* out, const float* table, int k, long long n) {                                      \
    cbp::constraint_quantize_impl<TYPE>(w, out, table, k, n);                                                  \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(cbp::kConstraintThreads) constraint_multiplier_step_##SUFFIX(   \
      const long long* meta, int n_layers, const float* table, int k, const float* scalars) {                  \
    cbp::constraint_multiplier_step_impl<TYPE>(meta, n_layers, table, k, scalars);                             \
  }

CBP_CONSTRAINT_KERNELS(f32, float)
CBP_CONSTRAINT_KERNELS(f16, __half)
CBP_CONSTRAINT_KERNELS(bf16, __nv_bfloat16)
