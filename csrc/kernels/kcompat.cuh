// kcompat.cuh: the one header CUDA kernels include. The same kernel source compiles
//   (a) with nvcc for the GPU, where these macros expand to plain CUDA, and
//   (b) with a host C++ compiler (no __CUDACC__) against the SIMT emulator in csrc/sim/, which runs
//       every CUDA thread as a fiber on the CPU and reports barrier/warp misuse as exceptions.
//
// Kernel-side API (identical in both modes):
//   KSHARED(T, name, N)   static shared array `T name[N]` (on the emulator: fresh per block and
//                         filled with 0xFF bytes, i.e. NaN, so reading before writing shows up).
//                         Raw `__shared__` is rejected on the emulator: it would be per-thread.
//   KDYN_SMEM(T, name)    `T* name` pointing at the block's dynamic shared memory (16-byte
//                         aligned; 0xFF-filled per block on the emulator).
//   KASSERT(cond)         checked on the emulator (reported with block/thread/file:line),
//                         compiled out by nvcc.
//   KCOMPAT_EMULATED      1 on the emulator, 0 under nvcc. Use it only to give inline PTX or
//                         cp.async helpers a scalar fallback, never for kernel logic.
//   threadIdx, blockIdx, blockDim, gridDim, warpSize, __syncthreads(_count/_and/_or),
//   __syncwarp, __shfl(_up/_down/_xor)_sync, __ballot_sync, __any_sync, __all_sync, __activemask,
//   atomics, __ldg, fast math, fp16/bf16/fp8 types and intrinsics: as in CUDA.
//
// Host-side API (launchers in csrc/cuda/*.cu; torch-free):
//   KLAUNCH(kernel, grid, block, smem_bytes, stream, args...)
//                         launch instead of <<<>>>. Throws std::runtime_error if the launch fails
//                         (nvcc: cudaGetLastError; emulator: any reported kernel error). Wrap
//                         template kernels whose argument list has a comma in parentheses:
//                         KLAUNCH((decode_kernel<float, 128>), ...).
//   kmemcpy_async(dst, src, bytes, stream)      cudaMemcpyAsync(..., cudaMemcpyDefault, stream).
//   kset_max_dynamic_smem(kernel, bytes)        opt a kernel in to more than 48 KiB of dynamic
//                                               shared memory (the emulator enforces it too).
//   knum_sms()            streaming multiprocessors of the current device (emulator: 108, an
//                         A100, or $SIMT_NUM_SMS).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)

#define KCOMPAT_EMULATED 0

#define KSHARED(T, name, N) __shared__ T name[N]

#define KDYN_SMEM(T, name)                                                          \
  extern __shared__ __align__(16) unsigned char kcompat_dynamic_shared_memory[]; \
  T* name = reinterpret_cast<T*>(kcompat_dynamic_shared_memory)

#define KASSERT(cond) static_cast<void>(sizeof((cond) ? 1 : 0))

#define KLAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                 \
  do {                                                                                        \
    kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__);                         \
    ::kcompat::throw_on_error(cudaGetLastError(), "launch of " #kernel, __FILE__, __LINE__); \
  } while (0)

namespace kcompat {

inline void throw_on_error(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + " at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(status));
  }
}

}  // namespace kcompat

inline void kmemcpy_async(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  kcompat::throw_on_error(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream),
                          "cudaMemcpyAsync", __FILE__, __LINE__);
}

template <typename... Params>
void kset_max_dynamic_smem(void (*kernel)(Params...), std::size_t bytes) {
  kcompat::throw_on_error(
      cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
      "cudaFuncSetAttribute", __FILE__, __LINE__);
}

inline int knum_sms() {
  int device = 0;
  int count = 0;
  kcompat::throw_on_error(cudaGetDevice(&device), "cudaGetDevice", __FILE__, __LINE__);
  kcompat::throw_on_error(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
                          "cudaDeviceGetAttribute", __FILE__, __LINE__);
  return count;
}

#else  // the SIMT emulator

#define KCOMPAT_EMULATED 1

#include "../sim/simt.h"

// The host headers define __shared__ as nothing, which would give every emulated thread a private
// copy. Make any use a compile error that names the replacement.
#undef __shared__
#define __shared__ __shared___is_per_thread_on_the_emulator_use_KSHARED_or_KDYN_SMEM

#if !defined(__launch_bounds__)
#define __launch_bounds__(...)
#endif

// One static tag per declaration (per template instantiation) identifies the block's buffer.
#define KSHARED(T, name, N)                                                              \
  static char name##_kshared_tag;                                                        \
  T(&name)[N] = *reinterpret_cast<T(*)[N]>(::simt::static_shared_memory(               \
      &name##_kshared_tag, sizeof(T) * (N), alignof(T), #name, __FILE__, __LINE__))

#define KDYN_SMEM(T, name) \
  T* name = reinterpret_cast<T*>(::simt::dynamic_shared_memory(__FILE__, __LINE__))

#define KASSERT(cond)                  \
  ((cond) ? static_cast<void>(0)       \
          : ::simt::assertion_failed(#cond, ::simt::Site{__FILE__, __LINE__}))

// The stream travels as the first variadic argument, so a kernel without parameters needs no
// __VA_OPT__ (C++20).
#define KLAUNCH(kernel, grid, block, smem_bytes, ...)                                   \
  ::simt::launch_kernel(#kernel, ::simt::Site{__FILE__, __LINE__}, kernel, dim3(grid), \
                        dim3(block), (smem_bytes), __VA_ARGS__)

inline void kmemcpy_async(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes != 0) std::memcpy(dst, src, bytes);
}

template <typename... Params>
void kset_max_dynamic_smem(void (*kernel)(Params...), std::size_t bytes) {
  ::simt::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
}

inline int knum_sms() {
  const char* configured = std::getenv("SIMT_NUM_SMS");
  return configured != nullptr && std::atoi(configured) > 0 ? std::atoi(configured) : 108;
}

#endif  // __CUDACC__
