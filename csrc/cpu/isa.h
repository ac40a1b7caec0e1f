// Run-time choice of the instruction set the CPU kernels use.
//
// By default the best variant the CPU supports runs. The environment variable
// PAGED_ATTN_CPU_ISA overrides it: "portable" forces the plain C++ kernels, "avx512" demands
// the AVX-512 kernels (an error on a CPU without them), "auto" or unset picks. It is read at
// every call, so tests can run both variants in one process.
#pragma once

namespace paged_attn::cpu {

enum class CpuIsa { kPortable, kAvx512 };

// True when the CPU and the OS support AVX-512 F, BW, VL and BF16 (Sapphire Rapids, Zen 4 and
// later): everything attention_avx512.cpp is compiled for.
bool cpu_supports_avx512();

// The variant to run now; throws std::invalid_argument for a bad PAGED_ATTN_CPU_ISA value.
CpuIsa selected_isa();

}  // namespace paged_attn::cpu
