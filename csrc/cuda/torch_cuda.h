// The torch CUDA host headers the extension's .cu launchers use (current stream, device
// guard, launch check), includable by every csrc/cuda/<op>.cu.
// A CPU-only torch ships these headers without the generated c10/cuda/impl/cuda_cmake_macros.h
// (it only defines Windows export macros), so `make cuda-check` can compile the .cu files
// against it; a CUDA torch has the file and includes it as usual.
#pragma once

#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
