// Run-time CPU feature detection and the PAGED_ATTN_CPU_ISA override (see isa.h).
#include "cpu/isa.h"

#include <cstdlib>
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

CpuIsa selected_isa() {
  const char* requested = std::getenv("PAGED_ATTN_CPU_ISA");
  const std::string choice = requested ? requested : "auto";
  if (choice == "auto" || choice.empty()) {
    return cpu_supports_avx512() ? CpuIsa::kAvx512 : CpuIsa::kPortable;
  }
  if (choice == "portable") return CpuIsa::kPortable;
  if (choice == "avx512") {
    if (!cpu_supports_avx512()) {
      throw std::invalid_argument(
          "paged_attn: PAGED_ATTN_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/BF16");
    }
    return CpuIsa::kAvx512;
  }
  throw std::invalid_argument("paged_attn: PAGED_ATTN_CPU_ISA must be auto, portable or avx512, got '" +
                              choice + "'");
}

}  // namespace paged_attn::cpu
