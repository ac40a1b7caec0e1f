// The AMX tile instructions the bf16 kernel uses (attention_amx.h), behind one interface with
// two implementations:
//   HardwareTiles  the instructions themselves (tileloadd, tdpbf16ps, ...), for CPUs with
//                  AMX-TILE and AMX-BF16 (Sapphire Rapids and later);
//   EmulatedTiles  a software model of the eight tile registers, following the Intel SDM's
//                  pseudocode, for any CPU. It exists so that tests execute the AMX loops
//                  (tile shapes, the VNNI query packing, the even/odd value trick) on machines
//                  without AMX, as the SIMT emulator does for the CUDA kernels. It is slow and
//                  is chosen only through PAGED_ATTN_CPU_ISA=amx-emulated.
// Misuse that real hardware answers with #UD or silent garbage (a product of tiles whose shapes
// do not chain, a tile row wider than 64 bytes, a tile used before configuration) throws
// std::logic_error from the emulator instead.
//
// Tile numbers are template arguments because the hardware encodes them in the instruction.
// Part of the AVX-512 translation unit (included by attention_amx.h); never compiled on its own.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace paged_attn::cpu {
namespace {

// The 64-byte operand of ldtilecfg, palette 1: rows and bytes per row of tiles 0-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

struct HardwareTiles {
  static void configure(const TileConfig& config) { _tile_loadconfig(&config); }
  static void release() { _tile_release(); }
  template <int kTile>
  static void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(kTile));
  }
  // Tile kTile <- its configured rows, `stride` bytes apart from `base`.
  template <int kTile>
  static void load(const void* base, int64_t stride) {
    asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(kTile) : "memory");
  }
  template <int kTile>
  static void store(void* base, int64_t stride) {
    asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(kTile) : "memory");
  }
  // C += A * B on bf16 pairs with fp32 sums (TDPBF16PS).
  template <int kC, int kA, int kB>
  static void dot_bf16() {
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(kC), "i"(kA), "i"(kB));
  }
};

struct EmulatedTiles {
  static constexpr int kTiles = 8;
  static constexpr int kMaxRows = 16;
  static constexpr int kRowBytes = 64;

  static void configure(const TileConfig& config) {
    Registers& state = registers();
    if (config.palette != 1) fail("palette must be 1");
    for (int tile = 0; tile < kTiles; ++tile) {
      if (config.rows[tile] > kMaxRows || config.bytes_per_row[tile] > kRowBytes) {
        fail("tile " + std::to_string(tile) + " is configured larger than 16 rows x 64 bytes");
      }
      state.rows[tile] = config.rows[tile];
      state.bytes_per_row[tile] = config.bytes_per_row[tile];
    }
    std::memset(state.data, 0, sizeof(state.data));
    state.configured = true;
  }
  static void release() { registers().configured = false; }

  template <int kTile>
  static void zero() {
    std::memset(tile<kTile>(), 0, kMaxRows * kRowBytes);
  }
  // Bytes past a row's configured width, and rows past the configured count, read as zero.
  template <int kTile>
  static void load(const void* base, int64_t stride) {
    uint8_t* data = tile<kTile>();
    std::memset(data, 0, kMaxRows * kRowBytes);
    const Registers& state = registers();
    for (int row = 0; row < state.rows[kTile]; ++row) {
      std::memcpy(data + row * kRowBytes, static_cast<const uint8_t*>(base) + row * stride,
                  state.bytes_per_row[kTile]);
    }
  }
  template <int kTile>
  static void store(void* base, int64_t stride) {
    const uint8_t* data = tile<kTile>();
    const Registers& state = registers();
    for (int row = 0; row < state.rows[kTile]; ++row) {
      std::memcpy(static_cast<uint8_t*>(base) + row * stride, data + row * kRowBytes,
                  state.bytes_per_row[kTile]);
    }
  }
  // C[m][n] += sum_k A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1], as the SDM states it:
  // bf16 inputs with denormals read as zero, each product added in fp32 in k order. (The
  // hardware also flushes denormal sums to zero; the model keeps them.)
  template <int kC, int kA, int kB>
  static void dot_bf16() {
    const Registers& state = registers();
    const int m_rows = state.rows[kC], n_pairs = state.bytes_per_row[kC] / 4;
    const int k_pairs = state.bytes_per_row[kA] / 4;
    if (state.rows[kA] != m_rows || state.rows[kB] != k_pairs ||
        state.bytes_per_row[kB] != state.bytes_per_row[kC] || state.bytes_per_row[kA] % 4 != 0 ||
        state.bytes_per_row[kC] % 4 != 0) {
      fail("tdpbf16ps on tiles whose shapes do not chain (C " + shape(kC) + ", A " + shape(kA) +
           ", B " + shape(kB) + ")");
    }
    float* c = reinterpret_cast<float*>(tile<kC>());
    const uint16_t* a = reinterpret_cast<const uint16_t*>(tile<kA>());
    const uint16_t* b = reinterpret_cast<const uint16_t*>(tile<kB>());
    constexpr int kHalvesPerRow = kRowBytes / 2;
    for (int m = 0; m < m_rows; ++m) {
      for (int n = 0; n < n_pairs; ++n) {
        float sum = c[m * kRowBytes / 4 + n];
        for (int k = 0; k < k_pairs; ++k) {
          for (int half = 0; half < 2; ++half) {
            sum += widen(a[m * kHalvesPerRow + 2 * k + half]) * widen(b[k * kHalvesPerRow + 2 * n + half]);
          }
        }
        c[m * kRowBytes / 4 + n] = sum;
      }
    }
  }

 private:
  struct Registers {
    alignas(64) uint8_t data[kTiles][kMaxRows * kRowBytes];
    uint8_t rows[kTiles] = {};
    uint16_t bytes_per_row[kTiles] = {};
    bool configured = false;
  };
  // Each at::parallel_for worker has its own tile state, as each core has on the hardware.
  static Registers& registers() {
    thread_local Registers state;
    return state;
  }
  template <int kTile>
  static uint8_t* tile() {
    static_assert(kTile >= 0 && kTile < kTiles);
    Registers& state = registers();
    if (!state.configured) fail("tile " + std::to_string(kTile) + " used with no tile configuration loaded");
    return state.data[kTile];
  }
  static float widen(uint16_t bits) {
    const uint32_t word = (bits & 0x7F80u) == 0 ? (bits & 0x8000u) << 16 : uint32_t{bits} << 16;
    float value;
    std::memcpy(&value, &word, sizeof(value));
    return value;
  }
  static std::string shape(int tile) {
    const Registers& state = registers();
    return std::to_string(state.rows[tile]) + "x" + std::to_string(state.bytes_per_row[tile]) + "B";
  }
  [[noreturn]] static void fail(const std::string& what) {
    throw std::logic_error("paged_attn: emulated AMX: " + what);
  }
};

}  // namespace
}  // namespace paged_attn::cpu
