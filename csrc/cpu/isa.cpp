// Run-time CPU feature detection and the PAGED_ATTN_CPU_ISA override (see isa.h).
#include "cpu/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace paged_attn::cpu {

bool cpu_supports_avx512() {
  // libgcc's checks include the OS having enabled the 512-bit register state (XGETBV).
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512bf16");
  return supported;
}

bool cpu_supports_amx() {
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!cpu_supports_avx512() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tiles = edx & (1u << 24);
    const bool bf16_tiles = edx & (1u << 22);
    // Linux keeps the 8 KiB tile state disabled until a process asks for it.
    constexpr long kArchRequestXcompPermission = 0x1023;
    constexpr long kXfeatureTileData = 18;
    return tiles && bf16_tiles &&
           syscall(SYS_arch_prctl, kArchRequestXcompPermission, kXfeatureTileData) == 0;
  }();
  return supported;
}

bool cpu_is_intel() {
  static const bool intel = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::string(vendor) == "GenuineIntel";
  }();
  return intel;
}

CpuIsa selected_isa() {
  const char* requested = std::getenv("PAGED_ATTN_CPU_ISA");
  const std::string choice = requested ? requested : "auto";
  if (choice == "auto" || choice.empty()) {
    return cpu_supports_amx() ? CpuIsa::kAmx
           : cpu_supports_avx512() ? CpuIsa::kAvx512
                                   : CpuIsa::kPortable;
  }
  if (choice == "portable") return CpuIsa::kPortable;
  if (choice == "avx512" || choice == "amx-emulated") {
    if (!cpu_supports_avx512()) {
      throw std::invalid_argument("paged_attn: PAGED_ATTN_CPU_ISA=" + choice +
                                  " but this CPU lacks AVX-512 F/BW/VL/BF16");
    }
    return choice == "avx512" ? CpuIsa::kAvx512 : CpuIsa::kAmxEmulated;
  }
  if (choice == "amx") {
    if (!cpu_supports_amx()) {
      throw std::invalid_argument(
          "paged_attn: PAGED_ATTN_CPU_ISA=amx but this CPU (or OS) lacks AMX-TILE/AMX-BF16");
    }
    return CpuIsa::kAmx;
  }
  throw std::invalid_argument(
      "paged_attn: PAGED_ATTN_CPU_ISA must be auto, portable, avx512, amx or amx-emulated, got '" +
      choice + "'");
}

}  // namespace paged_attn::cpu
