// CBP_HD: the qualifiers of scalar math shared by the C++ (CPU) and CUDA kernels, so one
// function body serves nvcc, NVRTC (the CuPy backends) and the host compiler.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CBP_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define CBP_HD inline
#endif
