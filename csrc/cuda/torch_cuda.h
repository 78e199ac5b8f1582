// The torch CUDA host headers the extension's .cu launchers use (current stream, device
// guard, launch check), includable by every csrc/cuda/<op>.cu, and what they share: the
// checked grid sizes and the one storage-dtype dispatch.
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

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace cbp {

// The launchers' grid sizes, checked against CUDA's limits (2^31 - 1 blocks along x, 65535
// along y): a launch past them would fail with "invalid configuration argument" only later.
inline unsigned int grid_x(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "cbp_kernels: ", blocks,
              " blocks exceed the CUDA grid's x limit (2^31 - 1)");
  return static_cast<unsigned int>(blocks);
}
inline unsigned int grid_y(int64_t blocks) {
  TORCH_CHECK(blocks <= 65535, "cbp_kernels: ", blocks, " blocks exceed the CUDA grid's y limit (65535)");
  return static_cast<unsigned int>(blocks);
}

// The 1-D grid of `threads`-thread blocks with one thread per item.
inline unsigned int blocks_for(int64_t items, int threads) { return grid_x((items + threads - 1) / threads); }

// A storage dtype as the extern "C" kernels see it: float, __half, __nv_bfloat16.
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
auto* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename DeviceType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

// Of the three instantiations of one extern "C" kernel, the one for storage dtype scalar_t.
template <typename scalar_t, typename F32, typename F16, typename BF16>
constexpr auto storage_kernel(F32 f32, F16 f16, BF16 bf16) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return f16;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return bf16;
  } else {
    return f32;
  }
}

}  // namespace cbp

// AT_DISPATCH over the storage dtypes the kernels exist for (the ops send float64 to the
// reference backend); the lambda sees scalar_t.
#define CBP_DISPATCH_STORAGE(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                   \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The kernel NAME_f32 / NAME_f16 / NAME_bf16 for the lambda's scalar_t (inside CBP_DISPATCH_STORAGE):
//   const auto kernel = CBP_STORAGE_KERNEL(neuron_forward); kernel<<<grid, block, 0, stream>>>(...);
#define CBP_STORAGE_KERNEL(NAME) ::cbp::storage_kernel<scalar_t>(NAME##_f32, NAME##_f16, NAME##_bf16)
