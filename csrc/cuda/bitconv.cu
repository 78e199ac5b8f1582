// CUDA entry points of bit packing and the bit-packed popcount convolution: check the
// tensors, fill the geometry, launch the kernels of bitconv.cuh on the current stream.
// bitconv2d runs the tensor-core kernel (mma.sync m16n8k256 .b1 AND+POPC) on sm_80+
// unless CBP_KERNELS_NO_TENSOR_CORES=1, else the CUDA-core __popc kernel; bitconv2d_lif runs
// the fused-epilogue kernel (one thread per output spike word, the time loop inside).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/bitconv_host.h"
#include "cuda/bitconv.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

constexpr int kThreads = 256;
constexpr int kMmaWarps = 4;  // warps per block of the tensor-core kernel (64 pixels x 32 channels)

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

at::Tensor bitpack_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bitpack: x must be a contiguous [R, C] tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto bytes = x.ne(0).to(at::kByte).contiguous();
  const int64_t rows = x.size(0), C = x.size(1), words = (C + 31) / 32;
  auto out = at::empty({rows, words}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  bitpack_u8_kernel<<<blocks_for(rows * words), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      bytes.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), rows, C, words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bitunpack_cuda(const at::Tensor& words, int64_t size, at::ScalarType dtype) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "bitunpack: words must be a contiguous int32 [R, W] tensor");
  const c10::cuda::CUDAGuard guard(words.device());
  const int64_t rows = words.size(0);
  auto bytes = at::empty({rows, size}, words.options().dtype(at::kByte));
  if (bytes.numel() > 0) {
    bitunpack_u8_kernel<<<blocks_for(rows * size), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), bytes.data_ptr<uint8_t>(), rows, words.size(1), size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return bytes.to(dtype);
}

bool use_tensor_cores(const at::Tensor& x) {
  const char* off = std::getenv("CBP_KERNELS_NO_TENSOR_CORES");
  if (off != nullptr && std::strcmp(off, "1") == 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  return major >= 8;
}

at::Tensor bitconv2d_cuda(const at::Tensor& x, const at::Tensor& planes, double scale,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BitConvCall c = bitconv_call(x, planes, bias, stride, padding, dilation, groups);
  if (c.out.numel() == 0) return c.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (use_tensor_cores(x)) {
    const int64_t pixels = c.g.N * c.g.OH * c.g.OW;
    const int64_t tiles = (c.g.out_per_group + 8 * CBP_MMA_NTILES - 1) / (8 * CBP_MMA_NTILES);
    const dim3 grid(static_cast<unsigned>((pixels + 16 * kMmaWarps - 1) / (16 * kMmaWarps)),
                    static_cast<unsigned>(groups * tiles));
    bitconv_mma_kernel<<<grid, 32 * kMmaWarps, 0, stream>>>(c.x, c.planes, c.bias_ptr, static_cast<float>(scale),
                                                            c.out_ptr, c.g);
  } else {
    bitconv_popc_kernel<<<blocks_for(c.out.numel()), kThreads, 0, stream>>>(c.x, c.planes, c.bias_ptr,
                                                                           static_cast<float>(scale), c.out_ptr, c.g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.out;
}

// x: int32 [T*Nb, H, W, G*Wg] (t major), planes [P, O, KH, KW, Wg], mul / add float32 [O]
// -> (spikes int32 [T*Nb, OH, OW, ceil(O/32)], v_last float32 [Nb, OH, OW, O]).
std::tuple<at::Tensor, at::Tensor> bitconv2d_lif_cuda(const at::Tensor& x, const at::Tensor& planes,
                                                      const at::Tensor& mul, const at::Tensor& add,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups, int64_t T,
                                                      double decay, double v_threshold, double v_reset,
                                                      bool soft_reset, int64_t kind, bool decay_input) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BitConvLifCall c = bitconv_lif_call(x, planes, mul, add, stride, padding, dilation, groups, T, v_threshold,
                                            v_reset, soft_reset, kind, decay_input);
  if (c.v_last.numel() == 0) return {c.spikes, c.v_last};
  const int64_t threads = c.spikes.size(-1) * c.v_last.numel() / c.v_last.size(-1);  // words x pixels
  bitconv_lif_kernel<<<blocks_for(threads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.x, c.planes, c.mul.data_ptr<float>(), c.add.data_ptr<float>(), c.g, T, static_cast<float>(decay),
      c.np.v_threshold, c.np.v_reset, c.np.kind, c.np.soft_reset, c.np.decay_input, c.spikes_ptr,
      c.v_last.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {c.spikes, c.v_last};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  m.impl("bitpack", &bitpack_cuda);
  m.impl("bitunpack", &bitunpack_cuda);
  m.impl("bitconv2d", &bitconv2d_cuda);
  m.impl("bitconv2d_lif", &bitconv2d_lif_cuda);
}

}  // namespace cbp
