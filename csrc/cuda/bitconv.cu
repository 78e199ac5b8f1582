// CUDA entry points of the bit-packed popcount convolution (declared in
// csrc/common/bitconv_api.h): check the tensors, fill the geometry, launch the kernels of
// bitconv.cuh on the current stream. bitconv2d runs the tensor-core kernel (mma.sync m16n8k256
// .b1 AND+POPC) on sm_80+ unless CBP_KERNELS_NO_TENSOR_CORES=1 or its grid would need more
// than 65535 blocks along y (groups * channel tiles), else the CUDA-core __popc kernel (a 1-D
// grid); bitconv2d_lif runs the fused-epilogue kernel (one thread per output spike word, the
// time loop inside).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/bitconv_api.h"
#include "common/bitconv_host.h"
#include "cuda/bitconv.cuh"
#include "cuda/torch_cuda.h"

namespace cbp {
namespace {

constexpr int kThreads = 256;
constexpr int kMmaWarps = 4;  // warps per block of the tensor-core kernel (64 pixels x 32 channels)

bool use_tensor_cores(const at::Tensor& x) {
  const char* off = std::getenv("CBP_KERNELS_NO_TENSOR_CORES");
  if (off != nullptr && std::strcmp(off, "1") == 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  return major >= 8;
}

}  // namespace

at::Tensor bitconv2d_cuda(const at::Tensor& x, const at::Tensor& planes, double scale,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BitConvCall c = bitconv_call(x, planes, bias, stride, padding, dilation, groups);
  if (c.out.numel() == 0) return c.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pixels = c.g.N * c.g.OH * c.g.OW;
  const int64_t mma_rows = groups * ((c.g.out_per_group + 8 * CBP_MMA_NTILES - 1) / (8 * CBP_MMA_NTILES));
  if (use_tensor_cores(x) && mma_rows <= 65535) {
    const dim3 grid(grid_x((pixels + 16 * kMmaWarps - 1) / (16 * kMmaWarps)), grid_y(mma_rows));
    bitconv_mma_kernel<<<grid, 32 * kMmaWarps, 0, stream>>>(c.x, c.planes, c.bias_ptr, static_cast<float>(scale),
                                                            c.out_ptr, c.g);
  } else {
    bitconv_popc_kernel<<<blocks_for(c.out.numel(), kThreads), kThreads, 0, stream>>>(
        c.x, c.planes, c.bias_ptr, static_cast<float>(scale), c.out_ptr, c.g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.out;
}

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
  bitconv_lif_kernel<<<blocks_for(threads, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.x, c.planes, c.mul.data_ptr<float>(), c.add.data_ptr<float>(), c.g, T, static_cast<float>(decay),
      c.np.v_threshold, c.np.v_reset, c.np.kind, c.np.soft_reset, c.np.decay_input, c.spikes_ptr,
      c.v_last.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {c.spikes, c.v_last};
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  CBP_IMPL(m, Bitconv2dOp, bitconv2d_cuda);
  CBP_IMPL(m, Bitconv2dLifOp, bitconv2d_lif_cuda);
}

}  // namespace cbp
