// Bit packing of {0,1} tensors on the CPU: rows of C values to ceil(C/32) 32-bit words
// (stored as int32), least significant bit first, zero padded, and back.
//   pack    word[r, w] = sum_{b<32, 32w+b<C} (x[r, 32w+b] != 0) << b
//   unpack  y[r, c]    = (word[r, c/32] >> (c % 32)) & 1
// Values were checked to be 0 or 1 by the caller (cbp_kernels/ops/bitpack/op.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

namespace cbp {
namespace {

template <typename scalar_t>
void pack_rows(const scalar_t* x, uint32_t* out, int64_t rows, int64_t C, int64_t words) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * C;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t begin = w * 32, end = std::min<int64_t>(C, begin + 32);
      uint32_t bits = 0;
      for (int64_t c = begin; c < end; ++c) {
        bits |= static_cast<uint32_t>(row[c] != scalar_t(0)) << (c - begin);
      }
      out[r * words + w] = bits;
    }
  }
}

template <typename scalar_t>
void unpack_rows(const uint32_t* words, scalar_t* y, int64_t rows, int64_t C, int64_t nwords) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      y[r * C + c] = static_cast<scalar_t>((words[r * nwords + c / 32] >> (c % 32)) & 1u);
    }
  }
}

// x: [R, C] contiguous, any real or bool dtype -> int32 [R, ceil(C/32)].
at::Tensor bitpack(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bitpack: x must be a contiguous [R, C] tensor");
  const int64_t rows = x.size(0), C = x.size(1), words = (C + 31) / 32;
  auto out = at::empty({rows, words}, x.options().dtype(at::kInt));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, x.scalar_type(), "bitpack", [&] {
    pack_rows<scalar_t>(x.data_ptr<scalar_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), rows, C, words);
  });
  return out;
}

// words: int32 [R, Wc] contiguous -> [R, size] of dtype with values 0 / 1.
at::Tensor bitunpack(const at::Tensor& words, int64_t size, at::ScalarType dtype) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kInt,
              "bitunpack: words must be a contiguous int32 [R, W] tensor");
  TORCH_CHECK(size <= words.size(1) * 32, "bitunpack: size exceeds the packed bits");
  const int64_t rows = words.size(0);
  auto out = at::empty({rows, size}, words.options().dtype(dtype));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, dtype, "bitunpack", [&] {
    unpack_rows<scalar_t>(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), out.data_ptr<scalar_t>(),
                          rows, size, words.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext, m) {
  m.def("bitpack(Tensor x) -> Tensor");
  m.def("bitunpack(Tensor words, int size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  m.impl("bitpack", &bitpack);
  m.impl("bitunpack", &bitunpack);
}

}  // namespace cbp
