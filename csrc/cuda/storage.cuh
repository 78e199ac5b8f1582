// Loads and stores of the kernels' storage types (float, __half, __nv_bfloat16) as float32:
// every kernel computes in float32 whatever it reads and writes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cbp {

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace cbp
