// The C entry points of one host-emulated kernel library (csrc/emu/cuda_emu.h), included
// last by the table that cbp_kernels/ops/_cuda_emu.py generates: after the kernel source,
// `cbp_emu_table` (one CBP_EMU_KERNEL per extern "C" kernel) and CBP_EMU_SOURCE_SHA256 (of
// the exact source text compiled). Called through ctypes.
#pragma once

extern "C" {

int cbp_emu_kernel_count() { return static_cast<int>(sizeof(cbp_emu_table) / sizeof(cbp_emu_table[0])); }
const char* cbp_emu_kernel_name(int i) { return cbp_emu_table[i].name; }
const char* cbp_emu_kernel_params(int i) { return cbp_emu_table[i].params.c_str(); }
const char* cbp_emu_source_sha256() { return CBP_EMU_SOURCE_SHA256; }

// Kernel i <<<grid, block, shared>>> with args as cudaLaunchKernel's (the addresses of the
// argument values); returns "" or the error.
const char* cbp_emu_launch(int i, const unsigned* grid, const unsigned* block, size_t shared, void** args) {
  static thread_local std::string error;
  error = ::cbp_emu::launch(cbp_emu_table[i].body, args, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]},
                            shared);
  return error.c_str();
}

// The storage conversions, exposed for the tests (against torch's).
void cbp_emu_f32_to_f16(const float* x, uint16_t* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = __float2half_rn(x[i]).bits;
}
void cbp_emu_f16_to_f32(const uint16_t* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = __half2float(__half{x[i]});
}
void cbp_emu_f32_to_bf16(const float* x, uint16_t* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = __float2bfloat16_rn(x[i]).bits;
}
void cbp_emu_bf16_to_f32(const uint16_t* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = __bfloat162float(__nv_bfloat16{x[i]});
}

}  // extern "C"
