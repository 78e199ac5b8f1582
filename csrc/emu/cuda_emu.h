// Host emulation of the CUDA device code in csrc/cuda/*.cuh, so that the test suite runs
// every extern "C" kernel on a CPU (cbp_kernels/ops/_cuda_emu.py builds and launches them).
// Force-included (g++ -include) before the exact text that the cupy backend hands NVRTC
// (cbp_kernels.ops._cuda_source.cuda_source(op)); csrc/emu/include/ stands in for
// <cuda_fp16.h> / <cuda_bf16.h>.
//
// Execution model, as on a GPU: the blocks of a launch run one after another; the threads of
// a block run cooperatively, one fiber (ucontext) per CUDA thread, switching only at
// __syncthreads and warp collectives (__shfl_*_sync, the mma.sync of mma_b1_and_popc), so
// shared memory, barriers and shuffles behave as on a device (between two sync points the
// threads run in thread order, then in reverse order, alternately: a missing barrier shows):
//   __syncthreads   waits until every thread of the block that has not exited is waiting;
//   warp collective waits until every lane of its mask is waiting at a collective; a lane of
//                   the mask that has exited (or does not exist) is an error of the kernel.
// A launch that deadlocks (a barrier some threads never reach) or breaks those rules fails
// with a message instead of hanging. __shared__ is a static (one block at a time);
// dynamic shared memory (CBP_DYNAMIC_SHARED) is filled with 0xff bytes (float NaN) before
// each block, so a read before the write shows. Arithmetic is the host's IEEE float32 (compile
// with -ffp-contract=off, as nvcc --fmad=false): + - * / sqrtf round as on the device; expf
// is the host libm's (correctly rounded or nearly), the device's is within 2 ulp, so results
// that go through expf agree to a tolerance, not bitwise. __half / __nv_bfloat16 convert with
// round-to-nearest-even, bit for bit as cuda_fp16.h / cuda_bf16.h (NaN: some quiet NaN).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define CBP_HOST_EMULATION 1
// The device compilation path of the sources (nvcc / NVRTC for sm_80): device branches such
// as `#ifdef __CUDA_ARCH__` are the ones emulated.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 800
#define __global__ [[cbp_emu::global]]  // marks the kernels for the table (see _cuda_emu.py)
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __shared__ static
#define CBP_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::cbp_emu::dynamic_shared())

struct uint3 {
  unsigned int x, y, z;
};
using dim3 = uint3;

namespace cbp_emu {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread (fiber); kernels' frames are small
constexpr size_t kPayload = 32;             // bytes a lane posts per warp collective (mma: 24)

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack;
  uint3 tid;
  int linear;
  State state;
  unsigned mask;                                // the warp collective's mask while AtWarp
  unsigned char outbox[kPayload];               // what this lane posts to it
  const unsigned char (*inbox)[kPayload];       // what the lanes posted, once released
  unsigned char snapshot[kWarp][kPayload];      // the posts of a group whose lowest lane this is
};

// The launch in progress (one at a time per OS thread).
struct Launch {
  uint3 grid, block, block_idx;
  int threads;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> dynamic;
  ucontext_t scheduler;
  Fiber* current;
  void (*body)(void* const*);
  void* const* args;
  std::string error;
};
inline thread_local Launch* g_launch = nullptr;

inline void fail(const std::string& message) {
  if (g_launch->error.empty()) g_launch->error = message;
}

inline void* dynamic_shared() { return g_launch->dynamic.data(); }

inline void yield(State s) {
  Fiber* f = g_launch->current;
  f->state = s;
  swapcontext(&f->ctx, &g_launch->scheduler);
}

inline void syncthreads() { yield(State::AtBarrier); }

// Posts this lane's payload, waits for the lanes of mask, returns what each of them posted.
inline const unsigned char (*warp_exchange(unsigned mask, const void* value, size_t bytes))[kPayload] {
  Fiber* f = g_launch->current;
  memcpy(f->outbox, value, bytes);
  f->mask = mask;
  yield(State::AtWarp);
  return f->inbox;
}

inline int lane_id() { return g_launch->current->linear % kWarp; }

template <typename T>
T shfl_from(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= kPayload && std::is_trivially_copyable_v<T>);
  auto buf = warp_exchange(mask, &v, sizeof(T));
  if (src < 0 || src >= kWarp || !((mask >> src) & 1u)) return v;  // outside the warp/mask: own value
  T r;
  memcpy(&r, buf[src], sizeof(T));
  return r;
}

// One block: a fiber per thread, run until all are done; barriers released when complete.
inline void fiber_main() {
  Launch* L = g_launch;
  L->body(L->args);
  L->current->state = State::Done;
}

// Releases each group of lanes waiting at a warp collective whose mask they all reached with
// that mask (a warp may hold several groups with disjoint masks, as independent thread
// scheduling allows); the group's posts are copied to its lowest lane's snapshot, which every
// member reads when it resumes (all released lanes run before the next release).
inline bool release_warps() {
  Launch* L = g_launch;
  bool released = false;
  for (int w = 0; w * kWarp < L->threads; ++w) {
    const int first = w * kWarp, n = std::min(kWarp, L->threads - first);
    for (int l0 = 0; l0 < n; ++l0) {
      if (L->fibers[first + l0].state != State::AtWarp) continue;
      const unsigned mask = L->fibers[first + l0].mask;
      bool ready = true;
      for (int l = 0; l < kWarp && ready; ++l) {
        if (!((mask >> l) & 1u)) continue;
        if (l >= n || L->fibers[first + l].state == State::Done) {
          char hex[16];
          snprintf(hex, sizeof hex, "%08x", mask);
          fail("warp collective with mask 0x" + std::string(hex) + " in warp " + std::to_string(w) + ": lane " +
               std::to_string(l) + (l >= n ? " does not exist" : " has exited"));
          break;  // released anyway (each lane keeps its own value), so that the launch ends
        }
        ready = L->fibers[first + l].state == State::AtWarp && L->fibers[first + l].mask == mask;
      }
      if (!ready) continue;
      Fiber& owner = L->fibers[first + l0];
      for (int l = 0; l < n; ++l) {
        Fiber& f = L->fibers[first + l];
        if (f.state != State::AtWarp || (f.mask != mask && l != l0)) continue;
        memcpy(owner.snapshot[l], f.outbox, kPayload);
        f.inbox = owner.snapshot;
        f.state = State::Runnable;
      }
      released = true;
    }
  }
  return released;
}

inline bool release_barrier() {
  Launch* L = g_launch;
  bool any = false;
  for (int i = 0; i < L->threads; ++i) {
    const State s = L->fibers[i].state;
    if (s == State::AtBarrier) any = true;
    else if (s != State::Done) return false;
  }
  if (!any) return false;
  for (int i = 0; i < L->threads; ++i)
    if (L->fibers[i].state == State::AtBarrier) L->fibers[i].state = State::Runnable;
  return true;
}

inline void run_block(Launch* L) {
  if (!L->dynamic.empty()) memset(L->dynamic.data(), 0xff, L->dynamic.size());
  for (int i = 0; i < L->threads; ++i) {
    Fiber& f = L->fibers[i];
    f.tid = {static_cast<unsigned>(i % L->block.x), static_cast<unsigned>(i / L->block.x % L->block.y),
             static_cast<unsigned>(i / (L->block.x * L->block.y))};
    f.linear = i;
    f.state = State::Runnable;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &L->scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (bool reverse = false;; reverse = !reverse) {  // each pass the other way: no order is favoured
    bool ran = false;
    for (int j = 0; j < L->threads; ++j) {
      const int i = reverse ? L->threads - 1 - j : j;
      if (L->fibers[i].state != State::Runnable) continue;
      L->current = &L->fibers[i];
      swapcontext(&L->scheduler, &L->fibers[i].ctx);
      ran = true;
    }
    if (ran) continue;
    if (release_warps() || release_barrier()) continue;
    int done = 0, barrier = 0, warp = 0;
    for (int i = 0; i < L->threads; ++i) {
      const State s = L->fibers[i].state;
      done += s == State::Done, barrier += s == State::AtBarrier, warp += s == State::AtWarp;
    }
    if (done == L->threads) return;
    fail("deadlock in block (" + std::to_string(L->block_idx.x) + ", " + std::to_string(L->block_idx.y) + ", " +
         std::to_string(L->block_idx.z) + "): " + std::to_string(barrier) + " threads at __syncthreads, " +
         std::to_string(warp) + " at a warp collective, " + std::to_string(done) + " exited");
    return;
  }
}

// Runs body(args) as the kernel <<<grid, block, shared>>>; returns the error ("" if none).
inline std::string launch(void (*body)(void* const*), void* const* args, uint3 grid, uint3 block, size_t shared) {
  Launch L{};
  L.grid = grid;
  L.block = block;
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads) return "block of " + std::to_string(threads) + " threads (1 to 1024)";
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    return "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
           ") out of range (y, z at most 65535)";
  if (shared > 227 * 1024) return "dynamic shared memory of " + std::to_string(shared) + " bytes";
  L.threads = static_cast<int>(threads);
  L.fibers.resize(L.threads);
  // Fiber stacks, kept for later launches on this OS thread; not zeroed: untouched pages cost nothing.
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < L.fibers.size()) stacks.emplace_back(new char[kStackBytes]);
  for (size_t i = 0; i < L.fibers.size(); ++i) L.fibers[i].stack = stacks[i].get();
  L.dynamic.resize(shared);
  L.body = body;
  L.args = args;
  Launch* outer = g_launch;
  g_launch = &L;
  for (unsigned z = 0; z < grid.z && L.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && L.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && L.error.empty(); ++x) {
        L.block_idx = {x, y, z};
        run_block(&L);
      }
  g_launch = outer;
  return L.error;
}

// ---- half / bfloat16 storage, round to nearest even ----
inline uint32_t f32_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u)  // below 2^-14: a subnormal half (units of 2^-24; exact scaling, RNE)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(nearbyintf(__builtin_bit_cast(float, a) * 16777216.0f)));
  uint32_t h = ((((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return static_cast<uint16_t>(sign | h);
}

inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return __builtin_bit_cast(float, f32_bits(v) | sign);
  }
  if (e == 31) return __builtin_bit_cast(float, sign | 0x7f800000u | (m << 13));
  return __builtin_bit_cast(float, sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16); }

// ---- the kernel table: parameters recovered from the kernel's type, args as cudaLaunchKernel's ----
template <typename T>
T load_arg(void* p) {
  T v;
  memcpy(&v, p, sizeof(T));  // by value, whatever the caller's alignment
  return v;
}

template <typename... A, size_t... I>
void invoke(void (*f)(A...), void* const* args, std::index_sequence<I...>) {
  f(load_arg<std::remove_cv_t<std::remove_reference_t<A>>>(args[I])...);
}

// One parameter as "<kind><bytes>": p pointer, f floating, i integer / bool, s struct.
template <typename T>
std::string param_code() {
  using U = std::remove_cv_t<std::remove_reference_t<T>>;
  const char kind = std::is_pointer_v<U> ? 'p' : std::is_floating_point_v<U> ? 'f' : std::is_integral_v<U> ? 'i' : 's';
  return kind + std::to_string(sizeof(U));
}

template <typename... A>
std::string param_codes(void (*)(A...)) {
  std::string s;
  ((s += (s.empty() ? "" : " ") + param_code<A>()), ...);
  return s;
}

struct Kernel {
  const char* name;
  void (*body)(void* const*);
  std::string params;
};

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
  return sizeof...(A);
}

template <auto F>
void body(void* const* args) {
  invoke(F, args, std::make_index_sequence<arity(F)>{});
}

}  // namespace cbp_emu

// ---- device intrinsics ----
#define blockIdx (::cbp_emu::g_launch->block_idx)
#define blockDim (::cbp_emu::g_launch->block)
#define gridDim (::cbp_emu::g_launch->grid)
#define threadIdx (static_cast<const uint3&>(::cbp_emu::g_launch->current->tid))

inline void __syncthreads() { ::cbp_emu::syncthreads(); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::cbp_emu::lane_id();
  return ::cbp_emu::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cbp_emu::lane_id(), in = (lane & (width - 1)) + static_cast<int>(delta);
  return ::cbp_emu::shfl_from(mask, v, in < width ? lane + static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cbp_emu::lane_id(), src = lane ^ lane_mask;
  return ::cbp_emu::shfl_from(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cbp_emu::lane_id(), in = (lane & (width - 1)) - static_cast<int>(delta);
  return ::cbp_emu::shfl_from(mask, v, in >= 0 ? lane - static_cast<int>(delta) : lane);
}
// Bit l of the ballot: lane l's predicate (lanes of mask).
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int mine = predicate != 0;
  auto posts = ::cbp_emu::warp_exchange(mask, &mine, sizeof mine);
  unsigned bits = 0;
  for (int l = 0; l < ::cbp_emu::kWarp; ++l) {
    int p;
    memcpy(&p, posts[l], sizeof p);
    if (((mask >> l) & 1u) && p) bits |= 1u << l;
  }
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { __ballot_sync(mask, 0); }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
constexpr int warpSize = 32;
using std::max;
using std::min;

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
// Correctly rounded float32 operations: the host's IEEE arithmetic (-ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
// Approximate on the device (a few ulp): the host's libm here, so not bitwise the device's.
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline unsigned __float_as_uint(float a) { return __builtin_bit_cast(unsigned, a); }
inline int __float_as_int(float a) { return __builtin_bit_cast(int, a); }
inline float __uint_as_float(unsigned a) { return __builtin_bit_cast(float, a); }
inline float __int_as_float(int a) { return __builtin_bit_cast(float, a); }
inline long long __double_as_longlong(double a) { return __builtin_bit_cast(long long, a); }
inline double __longlong_as_double(long long a) { return __builtin_bit_cast(double, a); }
// Blocks run one at a time and a block's threads only switch at barriers: plain updates are
// atomic. Each returns the old value.
namespace cbp_emu {
template <typename T, typename F>
T atomic_update(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace cbp_emu
template <typename T>
T atomicAdd(T* p, T v) {
  return ::cbp_emu::atomic_update(p, [v](T old) { return old + v; });
}
template <typename T>
T atomicMax(T* p, T v) {
  return ::cbp_emu::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T>
T atomicMin(T* p, T v) {
  return ::cbp_emu::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T>
T atomicExch(T* p, T v) {
  return ::cbp_emu::atomic_update(p, [v](T) { return v; });
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  return ::cbp_emu::atomic_update(p, [compare, v](T old) { return old == compare ? v : old; });
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return ::cbp_emu::f16_bits_to_f32(h.bits); }
inline __half __float2half(float f) { return {::cbp_emu::f32_to_f16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return {::cbp_emu::f32_to_bf16_bits(f)}; }
inline __half __float2half_rn(float f) { return {::cbp_emu::f32_to_f16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::cbp_emu::bf16_bits_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::cbp_emu::f32_to_bf16_bits(f)}; }

// mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc for one warp, per the PTX ISA's
// fragment tables (groupID = lane / 4, threadID_in_group = lane % 4; bit i of a register is
// element i & 31 of its 32 columns / rows, as the m16n8k128 table writes it):
//   A 16 x 256 (row):  a0, a1, a2, a3 of a lane hold row groupID (a0, a2) or groupID + 8 (a1, a3),
//                      columns threadID_in_group * 32 + (i & 31) (a0, a1) and + 128 (a2, a3);
//   B 256 x 8 (col):   b0, b1 hold column groupID, rows threadID_in_group * 32 + (i & 31) (b0), + 128 (b1);
//   C, D 16 x 8:       c0, c1 row groupID, c2, c3 row groupID + 8; columns threadID_in_group * 2 + (i & 1).
//   D[m][n] = C[m][n] + sum_k popc(A[m][k] & B[k][n]).
// (The same layouts as CUTLASS's cute MMA_Traits<SM80_16x8x256_S32U1U1S32_TN_XORPOPC>: ALayout
// ((4,8),(32,2,2)):((512,1),(16,8,2048)), BLayout ((4,8),(32,2)):((256,1),(8,1024)), SM80_16x8_Row.)
// Every lane of the warp must call it (the gather is a warp collective).
namespace cbp {
inline void mma_b1_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Frag {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  auto buf = ::cbp_emu::warp_exchange(0xffffffffu, &mine, sizeof(Frag));
  uint32_t A[16][8], B[8][8];  // A[row][32-bit column word], B[column][32-bit row word]
  for (int lane = 0; lane < 32; ++lane) {
    Frag f;
    memcpy(&f, buf[lane], sizeof(Frag));
    const int group = lane / 4, tig = lane % 4;
    for (int r = 0; r < 4; ++r) A[group + 8 * (r % 2)][tig + 4 * (r / 2)] = f.a[r];
    for (int r = 0; r < 2; ++r) B[group][tig + 4 * r] = f.b[r];
  }
  const int lane = ::cbp_emu::lane_id(), group = lane / 4, tig = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int m = group + 8 * (r / 2), n = tig * 2 + (r % 2);
    int32_t sum = 0;
    for (int w = 0; w < 8; ++w) sum += __builtin_popcount(A[m][w] & B[n][w]);
    d[r] += sum;
  }
}
}  // namespace cbp

// The table of a build: CBP_EMU_KERNEL(name) per extern "C" kernel (generated by _cuda_emu.py).
#define CBP_EMU_KERNEL(name) ::cbp_emu::Kernel{#name, &::cbp_emu::body<&name>, ::cbp_emu::param_codes(&name)},
