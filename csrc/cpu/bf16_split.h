// The one home of the exact split of float32 into three bfloat16 parts that the AMX-BF16
// convolution gradients use (conv_input_grad.cpp, conv_weight_grad.cpp; in Python
// cbp_kernels.ops.conv_input_grad.split_bf16): g = g1 + g2 + g3 by truncation, g1 = bits(g) &
// 0xFFFF0000, g2 the same of g - g1, g3 = g - g1 - g2, each subtraction exact in float32, 8 + 8 + 8
// significant bits, so g3 is exact in bfloat16 while it is normal.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace cbp {

// The next bfloat16 part of `rest` (its high 16 bits, returned in each lane's low half) and
// rest -= that part (exact in float32). Three calls from g give g1, g2, g3.
__attribute__((target("avx512f"))) inline __m512i next_bf16_part(__m512& rest) {
  const __m512i bits = _mm512_and_si512(_mm512_castps_si512(rest), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(bits));
  return _mm512_srli_epi32(bits, 16);
}

}  // namespace cbp
#endif
