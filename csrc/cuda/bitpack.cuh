// CUDA kernels of bit packing: extern "C" kernels with no torch includes, so that the extension
// (csrc/cuda/bitpack.cu) and CuPy's NVRTC (cbp_kernels/ops/bitpack/cupy.py) compile the same
// source. Format and semantics: csrc/common/bitpack_api.h, as the CPU kernel (csrc/cpu/bitpack.cpp).
//
// bitpack_SUFFIX(x, B, R, C, sb, sr, sc, words, out, non_binary)
//   x [B, R, C] of the storage type with element strides (sb, sr, sc), any of them; one thread
//   per output word (b, r, w) of out int32 [B, R, words] (contiguous, words = ceil(C/32)):
//     out[b, r, w] = OR_{i < 32, 32w + i < C} (x[b, r, 32w + i] != 0) << i
//   and *non_binary += the number of its values other than 0 and 1 (an integer atomicAdd of a
//   thread's count when it is not 0: exact, so the total does not depend on the order). The
//   caller zeroes *non_binary. Launch ceil(B * R * words / blockDim) blocks.
// bitunpack_u8(words, y, rows, nwords, size)
//   y[r, c] = (words[r, c / 32] >> (c % 32)) & 1 as uint8 [rows, size]; one thread per value.
// SUFFIX / storage type: b8 / bool, u8 / uint8, i8 / int8, i16 / int16, i32 / int32, i64 /
// int64, f16 / __half, bf16 / __nv_bfloat16, f32 / float, f64 / double (the CPU kernel's dtypes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cbp {

// The value in a type that holds it exactly, for the compares with 0 and 1 (-0.0 is 0; NaN is
// neither 0 nor 1): integers as long long, 16-bit floats as float (no __half operators: torch
// compiles with __CUDA_NO_HALF_OPERATORS__).
__device__ __forceinline__ long long bitpack_value(bool v) { return v ? 1 : 0; }
__device__ __forceinline__ long long bitpack_value(unsigned char v) { return v; }
__device__ __forceinline__ long long bitpack_value(signed char v) { return v; }
__device__ __forceinline__ long long bitpack_value(short v) { return v; }
__device__ __forceinline__ long long bitpack_value(int v) { return v; }
__device__ __forceinline__ long long bitpack_value(long long v) { return v; }
__device__ __forceinline__ float bitpack_value(__half v) { return __half2float(v); }
__device__ __forceinline__ float bitpack_value(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float bitpack_value(float v) { return v; }
__device__ __forceinline__ double bitpack_value(double v) { return v; }

template <typename scalar_t>
__device__ __forceinline__ void bitpack_impl(const scalar_t* __restrict__ x, long long B, long long R, long long C,
                                             long long sb, long long sr, long long sc, long long words,
                                             unsigned int* __restrict__ out, unsigned long long* __restrict__ non_binary) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * R * words) return;
  const long long w = i % words, row = i / words;
  const long long r = row % R, b = row / R;
  const scalar_t* src = x + b * sb + r * sr;
  const long long c0 = w * 32;
  const int n = C - c0 < 32 ? static_cast<int>(C - c0) : 32;
  unsigned int bits = 0u;
  unsigned long long bad = 0ull;
  for (int j = 0; j < n; ++j) {
    const auto v = bitpack_value(src[(c0 + j) * sc]);
    bits |= static_cast<unsigned int>(v != 0) << j;
    bad += (v != 0 && v != 1) ? 1ull : 0ull;
  }
  out[i] = bits;
  if (bad != 0ull) atomicAdd(non_binary, bad);
}

}  // namespace cbp

#define CBP_BITPACK_KERNEL(SUFFIX, TYPE)                                                                        \
  extern "C" __global__ void bitpack_##SUFFIX(const TYPE* x, long long B, long long R, long long C, long long sb, \
                                              long long sr, long long sc, long long words, unsigned int* out,    \
                                              unsigned long long* non_binary) {                                  \
    cbp::bitpack_impl<TYPE>(x, B, R, C, sb, sr, sc, words, out, non_binary);                                     \
  }

CBP_BITPACK_KERNEL(b8, bool)
CBP_BITPACK_KERNEL(u8, unsigned char)
CBP_BITPACK_KERNEL(i8, signed char)
CBP_BITPACK_KERNEL(i16, short)
CBP_BITPACK_KERNEL(i32, int)
CBP_BITPACK_KERNEL(i64, long long)
CBP_BITPACK_KERNEL(f16, __half)
CBP_BITPACK_KERNEL(bf16, __nv_bfloat16)
CBP_BITPACK_KERNEL(f32, float)
CBP_BITPACK_KERNEL(f64, double)

#undef CBP_BITPACK_KERNEL

extern "C" __global__ void bitunpack_u8(const unsigned int* __restrict__ words, unsigned char* __restrict__ y,
                                        long long rows, long long nwords, long long size) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * size) return;
  const long long r = i / size, c = i - r * size;
  y[i] = static_cast<unsigned char>((words[r * nwords + c / 32] >> (c % 32)) & 1u);
}
