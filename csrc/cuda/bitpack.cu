// CUDA entry points of bit packing (declared in csrc/common/bitpack_api.h): check the tensors,
// launch the kernels of csrc/cuda/bitpack.cuh on the current stream of x's device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "common/bitpack_api.h"
#include "cuda/bitpack.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

constexpr int kBitpackThreads = 256;  // not tuned on a GPU yet

// The extern "C" bitpack kernel of bitpack.cuh for the ATen dtype scalar_t.
template <typename scalar_t>
constexpr auto bitpack_kernel() {
  if constexpr (std::is_same_v<scalar_t, bool>) return &bitpack_b8;
  else if constexpr (std::is_same_v<scalar_t, uint8_t>) return &bitpack_u8;
  else if constexpr (std::is_same_v<scalar_t, int8_t>) return &bitpack_i8;
  else if constexpr (std::is_same_v<scalar_t, int16_t>) return &bitpack_i16;
  else if constexpr (std::is_same_v<scalar_t, int32_t>) return &bitpack_i32;
  else if constexpr (std::is_same_v<scalar_t, int64_t>) return &bitpack_i64;
  else if constexpr (std::is_same_v<scalar_t, at::Half>) return &bitpack_f16;
  else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return &bitpack_bf16;
  else if constexpr (std::is_same_v<scalar_t, float>) return &bitpack_f32;
  else return &bitpack_f64;
}

// The element pointer type a kernel takes (its first parameter).
template <typename Kernel>
struct FirstParam;
template <typename T, typename... Rest>
struct FirstParam<void (*)(T, Rest...)> {
  using type = T;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> bitpack_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "bitpack: x must be a [B, R, C] tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), R = x.size(1), C = x.size(2), words = (C + 31) / 32;
  auto out = at::empty({B, R, words}, x.options().dtype(at::kInt));
  auto non_binary = at::zeros({}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, non_binary};
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, x.scalar_type(), "bitpack_cuda", [&] {
    const auto kernel = bitpack_kernel<scalar_t>();
    using Element = typename FirstParam<std::remove_const_t<decltype(kernel)>>::type;
    kernel<<<blocks_for(out.numel(), kBitpackThreads), kBitpackThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<Element>(x.const_data_ptr<scalar_t>()), B, R, C, x.stride(0), x.stride(1), x.stride(2),
        words, reinterpret_cast<unsigned int*>(out.data_ptr<int32_t>()),
        reinterpret_cast<unsigned long long*>(non_binary.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, non_binary};
}

at::Tensor bitunpack_cuda(const at::Tensor& words, int64_t size, at::ScalarType dtype) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "bitunpack: words must be a contiguous int32 [R, W] tensor");
  TORCH_CHECK(size <= words.size(1) * 32, "bitunpack: size exceeds the packed bits");
  const c10::cuda::CUDAGuard guard(words.device());
  const int64_t rows = words.size(0);
  auto bytes = at::empty({rows, size}, words.options().dtype(at::kByte));
  if (bytes.numel() > 0) {
    bitunpack_u8<<<blocks_for(bytes.numel(), kBitpackThreads), kBitpackThreads, 0,
                   c10::cuda::getCurrentCUDAStream()>>>(reinterpret_cast<const unsigned int*>(words.data_ptr<int32_t>()),
                                                        bytes.data_ptr<uint8_t>(), rows, words.size(1), size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return bytes.to(dtype);
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  CBP_IMPL(m, BitpackOp, bitpack_cuda);
  CBP_IMPL(m, BitunpackOp, bitunpack_cuda);
}

}  // namespace cbp
