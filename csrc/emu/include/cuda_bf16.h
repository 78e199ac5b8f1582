// Stand-in for <cuda_bf16.h> in the host emulation: __half / __nv_bfloat16 live in csrc/emu/cuda_emu.h.
#pragma once
