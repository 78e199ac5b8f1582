// Multi-step spiking neuron on the CPU: forward and surrogate backward over all T
// timesteps in one call each. x_seq is [T, N] (contiguous, N = all trailing dims). OpenMP
// threads share out blocks of kBlock columns; inside a block the kernels walk narrow chunks
// of columns, each through all T steps, with the chunk's state in a local array and the inner
// loop over its columns vectorized. A chunk reads T strided rows per pass, more streams than the
// hardware prefetchers follow from T = 16 on, so each row read prefetches the same row two
// chunks ahead (the backward of long chunks: into L2, and one chunk ahead into L1), and large
// [T, N] outputs (S, dL/dX) go out with non-temporal stores (see kChunk, kTwoLevelBytes and
// stream_output for the measurements). The forward writes only S (and V[T-1]); the backward
// recomputes the chunk's H[0..T-1] from X into an L1/L2-resident buffer before its reverse
// time loop, so a training step streams X, S, dL/dS and dL/dX (4 [T, N] tensors, 5 passes)
// instead of also writing and reading H and reading S back (7 passes). H is returned empty.
// The arithmetic is float32 whatever the storage dtype: float16 / bfloat16 rows are widened as
// they are read (GCC vectorizes c10's conversions; widening a bfloat16 row first into a float
// row with AVX-512 shuffles, 3 per 32 values instead of GCC's 5, measured 1.04-1.10x slower
// backward) and rounded as they are written (bfloat16 dL/dX through cpu/bf16_rows.h where the
// CPU has AVX512-BF16).
// Equations: csrc/common/neuron_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <emmintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/neuron_api.h"
#include "common/neuron_host.h"
#include "common/neuron_math.h"
#include "cpu/bf16_rows.h"
#include "cpu/isa.h"

namespace cbp {
namespace {

// Columns per OpenMP work item (and per partial sum of PLIF's dL/dk).
constexpr int64_t kBlock = 16384;
// Columns per chunk, and how many chunks ahead a row is prefetched. Measured on cold [T, 2^20]
// float32 tensors, one thread of the shared 2-core AVX-512 Xeon (taskset, ATan LIF, median of
// 9 interleaved runs, GB/s of the ideal traffic; run-to-run noise ~10%), forward / backward:
//   T =                                      4            16           32           64
//   plain, 64 / 128 columns (before):    16.2 / 17.4  16.0 / 10.4  10.0 /  6.0   8.6 / 5.7
//   prefetch 1 chunk ahead, 64 / 128:    16.0 / 16.7  15.8 / 12.6  12.6 / 11.4  10.6 / 10.3
//   + non-temporal stores, 128 / 128:    21.0 / 14.2  22.4 / 21.9  20.6 / 19.0  16.3 / 14.2
//   prefetch 2 ahead + non-temporal:     24.1 / 18.1  23.0 / 22.4  20.8 / 18.4  14.7 / 13.6
// (memcpy: 13.5-13.9; at T = 4 dL/dX is too small to stream, see stream_output);
// with both, 32 or 64 columns forward and 64 or 256 backward were 5-25% slower than 128. A
// run-time chunk length was 20-30% slower at T=16 than a compile-time one, so only the last,
// partial chunk of a block has one. bfloat16 keeps 128 columns (256 bytes per row): the same
// 512 bytes as float32 (256 columns) measured 0.90-0.98x fwd+bwd at T = 4, 16, 64 (forward
// 0.89-0.94x), 64 columns 0.86-0.93x forward in L2-resident calls; prefetching the row slice 8
// steps ahead in the chunk's own sequence (at most 8 lines per cache set in flight: rows 2 MiB
// apart share sets) was 0.91-1.01x, into L2 instead of L1 0.94-1.03x; prefetching 1 chunk
// ahead 1.02-1.04x at T = 64 and 0.99x at T = 16, 3, 4 or 6 chunks 0.84-0.95x at T = 64 (one
// thread, A/B in one process, under load). With the backward's two-level prefetch
// (kTwoLevelBytes), bfloat16 chunks of 64 / 256 columns took 1.12x / 1.08x the backward time
// of 128 at T = 64, on one thread and on two.
constexpr int64_t kChunk = 128;
constexpr int64_t kPrefetchAhead = 2 * kChunk;
// The backward's rows go to L1 in two steps where a chunk's rows of one [T, N] tensor,
// T * kChunk elements, take kTwoLevelBytes or more: each row read prefetches the same row
// kPrefetchAhead columns ahead into L2 and kChunk ahead into L1. Between a prefetch two chunks
// ahead and its use, a chunk's backward touches two chunks of X and of dL/dS rows and its H
// buffer (T * kChunk floats), and from that size on these no longer fit the 48 KiB L1 with the
// prefetched lines, which were evicted before use. Measured (backward ms, two-level / L1 only,
// ATan, [T, 2^20], one thread, A/B in one process under load, median of 9-11 interleaved calls,
// one to four runs): bfloat16 T = 64 (16 KiB) 33.5-41.2 / 42.0-48.0, T = 32 18.9-19.2 / 18.6,
// T = 16 8.6-8.8 / 8.5-8.7; float32 T = 64 59.8-73.0 / 63.5-73.8, T = 32 (16 KiB) 24.3-27.5 /
// 26.0-29.9, T = 16 11.2-11.4 / 11.0-11.2; two threads (noisier), bfloat16 T = 64 56.0 / 74.0,
// float32 T = 64 87.7 / 100.2, T = 32 36.9 / 46.3; PLIF (dL/dk) bfloat16 T = 64 46.8 / 51.8,
// float32 T = 64 60.7 / 66.2, T = 32 29.7 / 30.8; Sigmoid bfloat16 T = 64 66.0 / 71.3, float32
// T = 64 76.4 / 85.6, T = 32 36.2 / 37.6. At T = 64, into L2 alone (two chunks ahead) was
// 0.96-0.98x of L1 alone, four chunks ahead 1.05-1.09x; the L2 prefetch three chunks ahead
// 1.00-1.03x of two; prefetcht1 and prefetcht2 the same. The forward, whose chunks touch only X
// and S rows, keeps L1 alone: two-level measured 0.92-1.07x there at T = 32 and 64 (the last two
// runs, 15 calls each: 0.94-1.00x float32, 0.96-1.00x bfloat16 at T = 64), within the noise.
constexpr int64_t kTwoLevelBytes = int64_t{16} << 10;

template <int64_t W>
using Fixed = std::integral_constant<int64_t, W>;

// The kernels' bodies are written once (always_inline) and instantiated twice: portable, and
// for AVX-512 (target attribute, chosen at run time), where the column loops become 16-wide.
// The surrogate is a template argument so the backward's column loop has no switch in it;
// the NeuronParams `q` are passed by value, so their fields are loop-invariant (no aliasing
// with the outputs) and the remaining flags become selects. -ffp-contract=off holds in both
// builds (no FMA), so the spikes stay bitwise equal to the reference.
#define CBP_ALWAYS_INLINE inline __attribute__((always_inline))
#define CBP_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#define CBP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))

// True when the CPU has AVX-512 (F, BW, VL, DQ) and cpu/isa.h allows it.
bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has && avx512_allowed();
}

// The chunk's slice of an optional [N] state vector: state[start..start+len) into out, or
// `fill` in every column when state is null (the op's default: v_init = v_reset, dL/dV[T-1] = 0
// for an unused V[T-1]), so a default state costs no [N] tensor and no pass over one.
template <typename Len>
CBP_ALWAYS_INLINE void load_state(const float* state, float fill, int64_t start, Len len, float* out) {
  if (state != nullptr) {
    std::copy(state + start, state + start + len, out);
  } else {
    std::fill(out, out + len, fill);
  }
}

// Prefetches row[ahead .. ahead + kChunk), where it is inside the tensor (end: one past its
// last element), with __builtin_prefetch's kLocality (3: into L1, 2: into L2).
template <int kLocality, typename scalar_t>
CBP_ALWAYS_INLINE void prefetch_slice(const scalar_t* row, int64_t ahead, const scalar_t* end) {
  const char* line = reinterpret_cast<const char*>(row + ahead);
  const char* stop = std::min(line + kChunk * sizeof(scalar_t), reinterpret_cast<const char*>(end));
  for (; line < stop; line += 64) __builtin_prefetch(line, 0, kLocality);
}

// Prefetches a row for the chunks to come: kPrefetchAhead columns ahead into L1, or where
// `two_level` that far into L2 and kChunk ahead into L1 (kTwoLevelBytes).
template <typename scalar_t>
CBP_ALWAYS_INLINE void prefetch_ahead(const scalar_t* row, const scalar_t* end, bool two_level = false) {
  if (two_level) {
    prefetch_slice<2>(row, kPrefetchAhead, end);
    prefetch_slice<3>(row, kChunk, end);
  } else {
    prefetch_slice<3>(row, kPrefetchAhead, end);
  }
}

// Non-temporal 64-byte stores of `bytes` (a multiple of 64) from src to dst, both 64-byte
// aligned: one instruction per cache line where the portable build writes four 16-byte ones
// (float32 forward 1.04-1.09x at [T, 2^20], T = 4..64, bfloat16 the same; one thread, A/B in
// one process).
__attribute__((target("avx512f"), noinline)) void stream_row_avx512(void* dst, const void* src, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<char*>(dst) + i),
                        _mm512_load_si512(static_cast<const char*>(src) + i));
  }
}

// Writes a chunk's output row: non-temporal stores (past the caches, no read for ownership)
// when `stream` (dst 64-byte aligned, len a whole number of 64 bytes; 64-byte stores in the
// AVX-512 build, kWide), else plain ones.
template <bool kWide, typename scalar_t, typename Len>
CBP_ALWAYS_INLINE void store_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, Len len, bool stream) {
  if (kWide && stream) {
    stream_row_avx512(dst, src, len * static_cast<int64_t>(sizeof(scalar_t)));
  } else if (stream) {
    for (int64_t i = 0; i < len; i += 16 / sizeof(scalar_t)) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_load_si128(reinterpret_cast<const __m128i*>(src + i)));
    }
  } else {
    std::copy(src, src + len, dst);
  }
}

// Writes a chunk's output row from float values, dst[i] = scalar_t(src[i]) (c10's rounding), as
// store_row. bfloat16 rows go through store_bf16_row_avx512 where `bf16_rows` (the CPU has
// AVX512-BF16 and this is the AVX-512 build: use_avx512_bf16()): bfloat16 backward 1.05-1.17x
// at [T, 2^20], T = 4..64 (ATan, one thread, A/B in one process), GCC's vectorized c10
// rounding being ~7 instructions per 16 values.
template <bool kWide, typename scalar_t, typename Len>
CBP_ALWAYS_INLINE void store_row_from_float(scalar_t* __restrict__ dst, const float* __restrict__ src, Len len,
                                            bool stream, bool bf16_rows) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    store_row<kWide>(dst, src, len, stream);
  } else {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_rows) return store_bf16_row_avx512(dst, src, len, stream);
    }
    alignas(64) scalar_t out[kChunk];
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<scalar_t>(src[i]);
    store_row<kWide>(dst, out, len, stream);
  }
}

// Whether the [T, N] output `out` gets non-temporal stores: its rows' full chunks are 64-byte
// aligned, and it is larger than `threshold` bytes: kStreamBackward for dL/dX, kStreamForward
// for S (and then V[T-1] too). Smaller ones stay in this VM's caches, where streaming them out
// cost time. dL/dX (same machine, one thread, min of 10 calls x 3 interleaved runs, backward ms,
// streamed / not): float32 [4, 2^20] (16 MiB) 3.1-3.4 / 2.1-3.1, [8, 2^20] 4.6-5.3 / 5.0-5.6,
// bfloat16 [16, 2^20] 8.3-8.5 / 9.7-11.3, float32 [16, 2^20] 10.8-11.7 / 15.2-16.8.
// S: the backward does not read it (H is recomputed from X), and streaming it paid from 8 MiB on
// (float32, one thread under load, forward ms, median of 31 interleaved calls, streamed S and
// V[T-1] / plain): [4, 2^18] (4 MiB) 0.41 / 0.56, [8, 2^17] (4 MiB) 0.60 / 0.40, [4, 2^19]
// 0.74 / 1.16, [4, 2^20] 1.73 / 2.36, [8, 2^20] 2.97 / 4.50; [4, 2^16], [4, 2^17] (1, 2 MiB)
// 0.21 / 0.12, 0.44 / 0.26. V[T-1] streamed alone: [4, 2^20] 2.16 / 2.36. bfloat16, one thread,
// A/B in one process: streaming dL/dX of [4, 2^20] and [8, 2^20] (8, 16 MiB) too was 0.83x and
// 0.92x backward; S of both not streamed 0.78x forward: the thresholds hold in bytes. They hold
// for the whole training step too (bench_neuron's step, whose outputs then stayed alive into the next
// call; [4, 2^20], one thread, A/B in one process under load, median of 15 steps): streaming
// dL/dX from 4 MiB on was 1.06x (float32) / 1.23x (bfloat16) slower, S streamed only above 16 MiB
// 1.14x / 1.08x slower.
constexpr int64_t kStreamBackward = int64_t{16} << 20;
constexpr int64_t kStreamForward = int64_t{4} << 20;
template <typename scalar_t>
bool stream_output(const scalar_t* out, int64_t T, int64_t N, int64_t threshold) {
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(scalar_t));
  return reinterpret_cast<std::uintptr_t>(out) % 64 == 0 && row_bytes % 64 == 0 && T * row_bytes > threshold;
}

// Calls chunk(start, len) over the columns [begin, end) in chunks of W: full chunks with a
// compile-time len (Fixed<W>), the last, partial one with a run-time len.
template <int64_t W, typename Chunk>
CBP_ALWAYS_INLINE void for_each_chunk(int64_t begin, int64_t end, Chunk&& chunk) {
  int64_t start = begin;
  for (; start + W <= end; start += W) chunk(start, Fixed<W>{});
  if (start < end) chunk(start, end - start);
}

// One chunk of len <= kChunk columns, all T steps: H = charge(V, X); S = (H - V_th >= 0);
// V = reset(H, S). `stream`: S's full chunks get non-temporal stores (stream_output), and so does
// V[T-1] where `v_last` is 64-byte aligned too.
template <bool kWide, typename scalar_t, typename Len>
CBP_ALWAYS_INLINE void forward_chunk(const scalar_t* __restrict__ x, const float* __restrict__ v_init, float k,
                                     const NeuronParams q, scalar_t* __restrict__ spike,
                                     float* __restrict__ v_last, int64_t T, int64_t N, int64_t start, Len len,
                                     bool stream) {
  alignas(64) float v[kChunk];
  alignas(64) scalar_t out[kChunk];
  stream = stream && len == kChunk;
  load_state(v_init, q.v_reset, start, len, v);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * N + start;
    prefetch_ahead(x + row, x + T * N);
    for (int64_t i = 0; i < len; ++i) {
      const float h = neuron_charge(v[i], static_cast<float>(x[row + i]), k, q);
      const float s = (h - q.v_threshold >= 0.0f) ? 1.0f : 0.0f;
      out[i] = static_cast<scalar_t>(s);
      v[i] = neuron_reset(h, s, q);
    }
    store_row<kWide>(spike + row, out, len, stream);
  }
  store_row<kWide>(v_last + start, v, len, stream && reinterpret_cast<std::uintptr_t>(v_last) % 64 == 0);
}

// One chunk of len <= kChunk columns, reverse time: gH = gS sg'(H - V_th) + gV dV/dH;
// gX = gH dH/dX; gV[t-1] = gH dH/dV. First H[t] of the chunk's columns is recomputed from X
// and v_init (the forward's equations, same arithmetic, so S = (H - V_th >= 0) is the forward's
// spike bit for bit) into h[t * len + i]. PLIF (kGradK): returns sum over the chunk's columns and
// t of gH dH/dk, with V[t-1] = reset(H[t-1], S[t-1]) (v_init at t = 0); per-column float sums,
// added up in double. grad_v_init may be null (not wanted). `stream`: as the forward's, for dL/dX;
// `two_level`: the rows' prefetch (kTwoLevelBytes).
template <bool kWide, typename scalar_t, int kSurrogate, bool kGradK, typename Len>
CBP_ALWAYS_INLINE double backward_chunk(const scalar_t* __restrict__ grad_spike, const float* __restrict__ grad_v_last,
                                        const scalar_t* __restrict__ x, const float* __restrict__ v_init, float k,
                                        const NeuronParams q, scalar_t* __restrict__ grad_x,
                                        float* __restrict__ grad_v_init, int64_t T, int64_t N, int64_t start,
                                        Len len, float* __restrict__ h, bool stream, bool two_level,
                                        bool bf16_rows) {
  const float dh_dv = charge_dh_dv(k, q);
  const float dh_dx = charge_dh_dx(k, q);
  float gv[kChunk], gk[kChunk], dk[kChunk], sg[kChunk];
  alignas(64) float out[kChunk];  // dL/dX[t] before store_row_from_float converts it
  stream = stream && len == kChunk;
  load_state(v_init, q.v_reset, start, len, gv);  // gv holds V while H is recomputed
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ xr = x + t * N + start;
    prefetch_ahead(xr, x + T * N, two_level);
    float* __restrict__ hr = h + t * len;
    for (int64_t i = 0; i < len; ++i) {
      hr[i] = neuron_charge(gv[i], static_cast<float>(xr[i]), k, q);
      gv[i] = neuron_reset(hr[i], (hr[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f, q);
    }
  }
  load_state(grad_v_last, 0.0f, start, len, gv);
  if (kGradK) std::fill(gk, gk + len, 0.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t row = t * N + start;
    prefetch_ahead(grad_spike + row, grad_spike + T * N, two_level);
    const float* __restrict__ hr = h + t * len;
    if (kGradK) {  // dk = dH[t]/dk; branches outside the column loops keep them vectorizable
      if (t > 0) {
        const float* __restrict__ hp = hr - len;
        for (int64_t i = 0; i < len; ++i) dk[i] = neuron_reset(hp[i], (hp[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f, q);
      } else {
        load_state(v_init, q.v_reset, start, len, dk);
      }
      if (q.decay_input) {
        for (int64_t i = 0; i < len; ++i) dk[i] = charge_dh_dk(dk[i], static_cast<float>(x[row + i]), q);
      } else {
        for (int64_t i = 0; i < len; ++i) dk[i] = charge_dh_dk(dk[i], 0.0f, q);
      }
    }
    // The Sigmoid's surrogate in a loop of its own: with its exp inlined into the loop below,
    // GCC no longer unswitched that loop's flags and left it scalar (5x slower). The others are
    // computed in that loop: one pass over the chunk instead of two (ATan at [T, 2^20], one
    // thread, A/B in one process: bfloat16 backward 1.02-1.09x at T = 4..64, float32 the same).
    constexpr bool kSurrogateLoop = kSurrogate == kSigmoid;
    if constexpr (kSurrogateLoop) {
      for (int64_t i = 0; i < len; ++i) sg[i] = surrogate_grad(hr[i] - q.v_threshold, kSurrogate, q.alpha);
    }
    for (int64_t i = 0; i < len; ++i) {
      const float sgi = kSurrogateLoop ? sg[i] : surrogate_grad(hr[i] - q.v_threshold, kSurrogate, q.alpha);
      const float s = (hr[i] - q.v_threshold >= 0.0f) ? 1.0f : 0.0f;
      const float gh = static_cast<float>(grad_spike[row + i]) * sgi + gv[i] * reset_dv_dh(hr[i], s, sgi, q);
      out[i] = gh * dh_dx;
      if (kGradK) gk[i] += gh * dk[i];
      gv[i] = gh * dh_dv;
    }
    store_row_from_float<kWide>(grad_x + row, out, len, stream, bf16_rows);
  }
  if (grad_v_init != nullptr) std::copy(gv, gv + len, grad_v_init + start);
  double sum = 0.0;
  if (kGradK) {
    for (int64_t i = 0; i < len; ++i) sum += gk[i];
  }
  return sum;
}

// This thread's buffer of at least `floats` floats, kept between calls (a fresh buffer per
// call was mapped and zeroed by the kernel each time: page faults). T * kChunk floats.
float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// The OpenMP loops over column blocks, one per instruction set. The chunk lambdas are
// always_inline, so they are compiled for the enclosing function's instruction set. The sfence
// orders a block's non-temporal stores before the loop's closing barrier (outputs seen by all).
#define CBP_NEURON_LOOPS(ATTR, SUFFIX, WIDE)                                                                     \
  template <typename scalar_t>                                                                                  \
  ATTR void forward_##SUFFIX(const scalar_t* x, const float* v_init, float k, const NeuronParams p,             \
                             scalar_t* spike, float* v_last, int64_t T, int64_t N) {                            \
    const bool stream = stream_output(spike, T, N, kStreamForward);                                             \
    _Pragma("omp parallel for schedule(static)") for (int64_t begin = 0; begin < N; begin += kBlock) {          \
      for_each_chunk<kChunk>(begin, std::min(begin + kBlock, N), [&](int64_t start, auto len)                  \
                                                                     CBP_ALWAYS_INLINE_LAMBDA {                 \
        forward_chunk<WIDE>(x, v_init, k, p, spike, v_last, T, N, start, len, stream);                          \
      });                                                                                                       \
      _mm_sfence();                                                                                             \
    }                                                                                                           \
  }                                                                                                             \
  template <typename scalar_t, int kSurrogate, bool kGradK>                                                     \
  ATTR void backward_##SUFFIX(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x,          \
                              const float* v_init, float k, const NeuronParams p, scalar_t* grad_x,             \
                              float* grad_v_init, double* partial, int64_t T, int64_t N) {                      \
    const int64_t blocks = (N + kBlock - 1) / kBlock;                                                           \
    const bool stream = stream_output(grad_x, T, N, kStreamBackward);                                           \
    const bool two_level = T * kChunk * static_cast<int64_t>(sizeof(scalar_t)) >= kTwoLevelBytes;             \
    const bool bf16_rows = WIDE && use_avx512_bf16();                                                           \
    _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < blocks; ++b) {                         \
      float* h = thread_scratch(T * kChunk);                                                                    \
      double sum = 0.0;                                                                                         \
      for_each_chunk<kChunk>(b * kBlock, std::min((b + 1) * kBlock, N), [&](int64_t start, auto len)           \
                                                                           CBP_ALWAYS_INLINE_LAMBDA {           \
        sum += backward_chunk<WIDE, scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p,    \
                                                            grad_x, grad_v_init, T, N, start, len, h, stream,   \
                                                            two_level, bf16_rows);                              \
      });                                                                                                       \
      _mm_sfence();                                                                                             \
      partial[b] = sum;                                                                                         \
    }                                                                                                           \
  }

CBP_NEURON_LOOPS(, portable, false)
CBP_NEURON_LOOPS(CBP_AVX512, avx512, true)
#undef CBP_NEURON_LOOPS

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const float* v_init, float k, const NeuronParams& p, scalar_t* spike,
                    float* v_last, int64_t T, int64_t N) {
  if (use_avx512()) {
    forward_avx512(x, v_init, k, p, spike, v_last, T, N);
  } else {
    forward_portable(x, v_init, k, p, spike, v_last, T, N);
  }
}

template <typename scalar_t, int kSurrogate, bool kGradK>
void backward_isa(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x, const float* v_init,
                  float k, const NeuronParams& p, scalar_t* grad_x, float* grad_v_init, double* partial, int64_t T,
                  int64_t N) {
  if (use_avx512()) {
    backward_avx512<scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                  partial, T, N);
  } else {
    backward_portable<scalar_t, kSurrogate, kGradK>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                    partial, T, N);
  }
}

// The run-time surrogate and need_grad_k become template arguments here, once per call.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_spike, const float* grad_v_last, const scalar_t* x, const float* v_init,
                     float k, const NeuronParams& p, bool need_grad_k, scalar_t* grad_x, float* grad_v_init,
                     double* partial, int64_t T, int64_t N) {
  auto with_surrogate = [&](auto surrogate) {
    constexpr int kSurrogate = decltype(surrogate)::value;
    if (need_grad_k) {
      backward_isa<scalar_t, kSurrogate, true>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                               partial, T, N);
    } else {
      backward_isa<scalar_t, kSurrogate, false>(grad_spike, grad_v_last, x, v_init, k, p, grad_x, grad_v_init,
                                                partial, T, N);
    }
  };
  switch (p.surrogate) {
    case kATan: return with_surrogate(std::integral_constant<int, kATan>{});
    case kSigmoid: return with_surrogate(std::integral_constant<int, kSigmoid>{});
    case kRectangle: return with_surrogate(std::integral_constant<int, kRectangle>{});
    case kTriangle: return with_surrogate(std::integral_constant<int, kTriangle>{});
    default: return with_surrogate(std::integral_constant<int, kPiecewiseQuadratic>{});
  }
}

}  // namespace

// Returns {S, V[T-1], H}; H is empty: the backward recomputes it from X (see the top).
// An empty v_init means V[-1] = v_reset (0 for the soft reset) in every column.
std::vector<at::Tensor> neuron_forward_cpu(const at::Tensor& x_seq, const at::Tensor& v_init,
                                           const at::Tensor& decay, double v_threshold, double v_reset,
                                           bool soft_reset, int64_t kind, bool decay_input) {
  const auto p = neuron_params(static_cast<float>(v_threshold), static_cast<float>(v_reset), static_cast<int>(kind),
                               soft_reset, decay_input, false, 0, 1.0f);
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto x = x_seq.contiguous();
  at::Tensor v0;
  const float* v0_data = optional_state(v_init, v0);
  // Plain allocator memory. Fresh pages cost first-touch faults (~2 us per 4 KiB page on this
  // VM: +35 ms on a [16, 2^20] float32 call); advising the outputs measured no better overall
  // (one thread, A/B in one process): madvise(MADV_HUGEPAGE) cut a call on fresh mmap'd memory
  // 2.5x (92.6 -> 36.6 ms at T = 16) but made one on freshly grown heap 10-50x slower (huge pages
  // backed by the host on first touch), and MADV_POPULATE_WRITE cost 5-15% on resident pages.
  auto spike = at::empty_like(x);
  auto v_last = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  const float k = decay.item<float>();
  AT_DISPATCH_V2(x.scalar_type(), "neuron_forward_cpu", AT_WRAP([&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), v0_data, k, p, spike.data_ptr<scalar_t>(),
                             v_last.data_ptr<float>(), T, N);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {spike, v_last, x.new_empty({0})};
}

// h_seq and spike_seq are not read (the forward saved neither H nor needs S: both are
// recomputed from x_seq, which must be the forward's input). An empty grad_v_last means
// dL/dV[T-1] = 0; an empty v_init the forward's default, and then dL/dv_init is returned empty.
std::vector<at::Tensor> neuron_backward_cpu(const at::Tensor& grad_spike, const at::Tensor& grad_v_last,
                                            const at::Tensor& h_seq, const at::Tensor& spike_seq,
                                            const at::Tensor& x_seq, const at::Tensor& v_init,
                                            const at::Tensor& decay, double v_threshold, double v_reset,
                                            bool soft_reset, int64_t kind, bool decay_input, bool detach_reset,
                                            int64_t surrogate, double alpha, bool need_grad_decay) {
  TORCH_CHECK(x_seq.sizes() == grad_spike.sizes(), "neuron_backward (cpu) recomputes H from x_seq: it must be the "
              "forward's input [T, *], got shape ", x_seq.sizes(), " for grad_spike ", grad_spike.sizes());
  const auto p = neuron_params(static_cast<float>(v_threshold), static_cast<float>(v_reset), static_cast<int>(kind),
                               soft_reset, decay_input, detach_reset, static_cast<int>(surrogate),
                               static_cast<float>(alpha));
  const int64_t T = x_seq.size(0);
  const int64_t N = x_seq.numel() / T;
  auto gs = grad_spike.contiguous();
  auto x = x_seq.contiguous();
  at::Tensor gvl, v0;
  const float* gvl_data = optional_state(grad_v_last, gvl);
  const float* v0_data = optional_state(v_init, v0);
  auto grad_x = at::empty_like(x);
  auto grad_v_init = at::empty({v0_data != nullptr ? N : 0}, x.options().dtype(at::kFloat));
  auto partial = at::empty({(N + kBlock - 1) / kBlock}, x.options().dtype(at::kDouble));  // one per block
  const float k = decay.item<float>();
  AT_DISPATCH_V2(x.scalar_type(), "neuron_backward_cpu", AT_WRAP([&] {
    backward_kernel<scalar_t>(gs.data_ptr<scalar_t>(), gvl_data, x.data_ptr<scalar_t>(), v0_data, k, p,
                              need_grad_decay, grad_x.data_ptr<scalar_t>(),
                              v0_data != nullptr ? grad_v_init.data_ptr<float>() : nullptr,
                              partial.data_ptr<double>(), T, N);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  auto grad_decay = partial.sum().to(at::kFloat);
  return {grad_x, grad_v_init.view(v_init.sizes()), grad_decay};
}

TORCH_LIBRARY_IMPL(cbp_kernels_ext, CPU, m) {
  CBP_IMPL(m, NeuronForwardOp, neuron_forward_cpu);
  CBP_IMPL(m, NeuronBackwardOp, neuron_backward_cpu);
}

}  // namespace cbp
