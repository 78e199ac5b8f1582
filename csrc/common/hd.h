// CBP_HD: the qualifiers of scalar math shared by the C++ (CPU) and CUDA kernels, so one
// function body serves nvcc, NVRTC (the CuPy backends) and the host compiler.
// CBP_UNROLL: unroll the next loop fully on the device (a constant trip count keeps its
// arrays in registers); nothing for the host compiler.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CBP_HD __host__ __device__ __forceinline__
#define CBP_UNROLL _Pragma("unroll")
#else
#include <cmath>
#define CBP_HD inline
#define CBP_UNROLL
#endif
