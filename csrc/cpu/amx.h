// The one home of what every AMX kernel needs (Sapphire Rapids and later): whether this
// process may use the tile unit, and the tile configuration they all run under.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/isa.h"

namespace cbp {

// True when the CPU has AMX-TILE and the instruction set `int8` (AMX-INT8) or else AMX-BF16,
// AVX-512BW (the kernels' packing), Linux grants this process the tile state, and cpu/isa.h
// allows AMX (CBP_KERNELS_NO_AMX=1 tests the other paths).
inline bool amx_usable(bool int8) {
  if (!amx_allowed() || !__builtin_cpu_supports("avx512bw")) return false;
#ifdef __linux__
  static const unsigned features = [] {  // CPUID.(7, 0).EDX: bit 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0 || !(d & (1u << 24))) return 0u;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0 ? d : 0u;
  }();
  return (features & (1u << (int8 ? 25 : 22))) != 0;
#else
  return false;
#endif
}

// Palette 1, tiles 0-7 all 16 rows x 64 bytes. A constant in memory, not a stack copy: GCC
// may drop the stores to a local struct whose only reader is LDTILECFG (seen when the caller
// was not inlined: the tiles then ran unconfigured and TILEZERO raised SIGILL).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
inline constexpr TileConfig kTileConfig{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// Configure the tiles on this thread (each OpenMP thread before its first tile instruction;
// _tile_release() when it is done).
__attribute__((target("amx-tile"))) inline void amx_tile_config() { _tile_loadconfig(&kTileConfig); }

}  // namespace cbp
#endif
