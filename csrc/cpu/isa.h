// Run-time choice of the instruction set the CPU kernels use.
//
// By default the best variant the CPU supports runs. The environment variable
// PAGED_ATTN_CPU_ISA overrides it: "portable" forces the plain C++ kernels, "avx512" the
// AVX-512 kernels, "amx" the AVX-512 kernels with AMX tiles for bf16 scores and value sums
// (each an error on a CPU without it), "auto" or unset picks. "amx-emulated" runs the AMX
// kernels on a software model of the tiles (csrc/cpu/amx_tiles.h), on any AVX-512 CPU: it is
// slow, and exists so that tests execute the AMX code where the hardware lacks AMX. The
// variable is read at every call, so tests can run every variant in one process. The cache
// ops follow it too: large copies use AVX-512 streaming stores unless it says "portable".
#pragma once

namespace paged_attn::cpu {

enum class CpuIsa { kPortable, kAvx512, kAmx, kAmxEmulated };

// True when the CPU and the OS support AVX-512 F, BW, VL and BF16 (Sapphire Rapids, Zen 4 and
// later): everything attention_avx512.cpp is compiled for.
bool cpu_supports_avx512();

// True when the CPU has AMX-TILE and AMX-BF16 and the OS granted this process the tile state
// (Linux arch_prctl ARCH_REQ_XCOMP_PERM, requested on the first call).
bool cpu_supports_amx();

// True on Intel CPUs (cpuid vendor GenuineIntel): some prefetch choices were measured to go
// the other way on AMD (see attention_item.h).
bool cpu_is_intel();

// The variant to run now; throws std::invalid_argument for a bad PAGED_ATTN_CPU_ISA value.
CpuIsa selected_isa();

}  // namespace paged_attn::cpu
