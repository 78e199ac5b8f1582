// The ONE run-time switch of the CPU kernels' instruction sets: every kernel asks these
// helpers, never the environment itself. Read per call (a getenv: nanoseconds next to a
// kernel), so the tests run every path in one process. The variables and their one meaning:
//   CBP_KERNELS_CPU_ISA=base|avx2|avx512   the widest instruction set the kernels may use
//                                           (unset or any other value: no cap);
//   CBP_KERNELS_NO_AVX512=1                caps it at AVX2 (the portable / AVX2 paths);
//   CBP_KERNELS_NO_AMX=1                   no AMX tiles (the popcount conv's AVX-512 path; the
//                                           conv gradients' ATen float32 call);
//   CBP_KERNELS_NO_AVX512_BF16=1           no AVX512-BF16 conversions (the neuron's bfloat16
//                                           rows through c10's cast, as on AVX-512 CPUs without it).
// A "=1" switch with any other value is off. Each kernel still checks that the CPU has the
// features it uses (__builtin_cpu_supports) before taking a path these helpers allow.
#pragma once

#include <cstdlib>
#include <cstring>

namespace cbp {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline bool env_is_one(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// The widest instruction set the environment allows (kAvx512 when nothing caps it).
inline Isa isa_cap() {
  Isa cap = Isa::kAvx512;
  if (const char* name = std::getenv("CBP_KERNELS_CPU_ISA")) {
    if (std::strcmp(name, "base") == 0) cap = Isa::kBase;
    else if (std::strcmp(name, "avx2") == 0) cap = Isa::kAvx2;
  }
  if (env_is_one("CBP_KERNELS_NO_AVX512") && cap == Isa::kAvx512) cap = Isa::kAvx2;
  return cap;
}

inline bool avx512_allowed() { return isa_cap() == Isa::kAvx512; }
inline bool amx_allowed() { return avx512_allowed() && !env_is_one("CBP_KERNELS_NO_AMX"); }
inline bool avx512_bf16_allowed() { return avx512_allowed() && !env_is_one("CBP_KERNELS_NO_AVX512_BF16"); }

}  // namespace cbp
