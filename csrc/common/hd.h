// CBP_HD: the qualifiers of scalar math shared by the C++ (CPU) and CUDA kernels, so one
// function body serves nvcc, NVRTC (the CuPy backends) and the host compiler.
// CBP_UNROLL: unroll the next loop fully on the device (a constant trip count keeps its
// arrays in registers); nothing for the host compiler.
// CBP_DYNAMIC_SHARED(type, name): declares `name`, the block's dynamic shared memory as a
// `type` array (the host emulation, csrc/emu/cuda_emu.h, defines its own).
#pragma once

// The kernels round as their references do only with IEEE division, sqrt and exp and no
// flush to zero: --use_fast_math would silently break that.
#if defined(__USE_FAST_MATH__) || defined(__FAST_MATH__)
#error "cbp_kernels: compile without --use_fast_math / -ffast-math (the kernels need IEEE division and sqrt)"
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CBP_HD __host__ __device__ __forceinline__
#define CBP_UNROLL _Pragma("unroll")
#ifndef CBP_DYNAMIC_SHARED
#define CBP_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
#else
#include <cmath>
#define CBP_HD inline
#define CBP_UNROLL
#endif
