// Host-side helpers of the neuron op's entry points, shared by the CPU (csrc/cpu/neuron.cpp)
// and CUDA (csrc/cuda/neuron.cu) launchers. Torch headers: not for NVRTC (the kernels' own
// header is common/neuron_math.h).
#pragma once

#include <ATen/ATen.h>

namespace cbp {

// The data of an optional [N] float32 state (v_init, dL/dV[T-1]): null when it is empty, the
// op's default (v_reset, or 0), which the kernels apply without reading a tensor; `keep` holds
// the contiguous copy alive.
inline const float* optional_state(const at::Tensor& state, at::Tensor& keep) {
  if (state.numel() == 0) return nullptr;
  keep = state.contiguous();
  return keep.data_ptr<float>();
}

}  // namespace cbp
