// CUDA entry points of bit packing and the bit-packed popcount convolution: check the
// tensors, fill the geometry, launch the kernels of bitconv.cuh on the current stream.
// bitconv2d runs the tensor-core kernel (mma.sync m16n8k256 .b1 AND+POPC) on sm_80+
// unless CBP_KERNELS_NO_TENSOR_CORES=1, else the CUDA-core __popc kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

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
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kInt && x.is_contiguous(), "bitconv2d: x must be contiguous int32 [N, H, W, Cw]");
  TORCH_CHECK(planes.dim() == 5 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              "bitconv2d: planes must be contiguous int32 [P, O, KH, KW, Wg]");
  const c10::cuda::CUDAGuard guard(x.device());
  BitConvGeometry g{};
  g.N = x.size(0); g.H = x.size(1); g.W = x.size(2);
  g.planes = planes.size(0); g.KH = planes.size(2); g.KW = planes.size(3);
  g.stride_h = stride[0]; g.stride_w = stride[1]; g.pad_h = padding[0]; g.pad_w = padding[1];
  g.dil_h = dilation[0]; g.dil_w = dilation[1];
  g.groups = groups; g.words_per_group = planes.size(4); g.out_per_group = planes.size(1) / groups;
  TORCH_CHECK(x.size(3) == groups * g.words_per_group, "bitconv2d: x words per pixel do not match the planes");
  g.OH = bitconv_out_size(g.H, g.KH, g.stride_h, g.pad_h, g.dil_h);
  g.OW = bitconv_out_size(g.W, g.KW, g.stride_w, g.pad_w, g.dil_w);
  const int64_t O = planes.size(1);
  auto out = at::empty({g.N, g.OH, g.OW, O}, x.options().dtype(at::kFloat));
  at::Tensor bias_c;
  const float* b = nullptr;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == at::kFloat && bias_c.numel() == O, "bitconv2d: bias must be float32 [O]");
    b = bias_c.data_ptr<float>();
  }
  if (out.numel() == 0) return out;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  const auto* wp = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (use_tensor_cores(x)) {
    const int64_t pixels = g.N * g.OH * g.OW;
    const int64_t tiles = (g.out_per_group + 8 * CBP_MMA_NTILES - 1) / (8 * CBP_MMA_NTILES);
    const dim3 grid(static_cast<unsigned>((pixels + 16 * kMmaWarps - 1) / (16 * kMmaWarps)),
                    static_cast<unsigned>(groups * tiles));
    bitconv_mma_kernel<<<grid, 32 * kMmaWarps, 0, stream>>>(xp, wp, b, static_cast<float>(scale),
                                                            out.data_ptr<float>(), g);
  } else {
    bitconv_popc_kernel<<<blocks_for(out.numel()), kThreads, 0, stream>>>(xp, wp, b, static_cast<float>(scale),
                                                                         out.data_ptr<float>(), g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CUDA, m) {
  m.impl("bitpack", &bitpack_cuda);
  m.impl("bitunpack", &bitunpack_cuda);
  m.impl("bitconv2d", &bitconv2d_cuda);
}

}  // namespace cbp
