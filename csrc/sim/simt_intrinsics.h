// CUDA device intrinsics for kernels compiled by a host compiler against the SIMT emulator:
// block barriers, warp shuffles and votes (routed to the scheduler), and the device-only math,
// atomic, bit and fp16/bf16 functions that cuda_fp16.h/cuda_bf16.h/glibc do not provide on the
// host. Conversions (__float2half, __float2bfloat16, __nv_cvt_float_to_fp8, ...) already work on
// the host and come from the CUDA headers unchanged.
//
// Sync-point intrinsics take two hidden trailing parameters defaulted to __builtin_FILE() and
// __builtin_LINE(), which the compiler fills with the caller's position for error reports.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt_scheduler.h"

namespace simt {

// Warp exchanges move raw bytes: __half2 and friends are not trivially copyable on the host.
template <typename T>
std::uint64_t to_lane_bits(const T& value) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t),
                "warp intrinsics move at most 8 bytes per lane");
  std::uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&value), sizeof(T));
  return bits;
}

template <typename T>
T from_lane_bits(std::uint64_t bits) {
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));
  return value;
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, const T& value, int arg, int width, Site site) {
  Scheduler& scheduler = running_scheduler(warp_op_name(op), site);
  return from_lane_bits<T>(
      scheduler.warp_exchange(op, mask, to_lane_bits(value), sizeof(T), arg, width, site));
}

inline std::uint64_t vote(WarpOp op, unsigned mask, int predicate, Site site) {
  Scheduler& scheduler = running_scheduler(warp_op_name(op), site);
  return scheduler.warp_exchange(op, mask, predicate != 0, sizeof(int), 0, 32, site);
}

inline int block_barrier(BarrierOp op, int predicate, Site site) {
  return running_scheduler(barrier_op_name(op), site).barrier(op, predicate, site);
}

inline void* static_shared_memory(const void* tag, std::size_t bytes, std::size_t alignment,
                                  const char* name, const char* file, int line) {
  const Site site{file, line};
  return running_scheduler("KSHARED", site).static_shared(tag, bytes, alignment, name, site);
}

inline void* dynamic_shared_memory(const char* file, int line) {
  return running_scheduler("KDYN_SMEM", Site{file, line}).dynamic_shared();
}

}  // namespace simt

// ------------------------------------------------------------------------------------------------
// Block barriers

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::block_barrier(simt::BarrierOp::kPlain, 0, {file, line});
}
inline int __syncthreads_count(int predicate, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return simt::block_barrier(simt::BarrierOp::kCount, predicate, {file, line});
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return simt::block_barrier(simt::BarrierOp::kAnd, predicate, {file, line});
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return simt::block_barrier(simt::BarrierOp::kOr, predicate, {file, line});
}

// Fibers share one OS thread and memory is coherent, so fences only stop compiler reordering.
inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// ------------------------------------------------------------------------------------------------
// Warp intrinsics: exactly the lanes of `mask` that have not exited meet; the caller must be one
// of them. A shuffle reading a lane outside the exchange gets all-ones bytes (NaN).

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  simt::vote(simt::WarpOp::kSyncwarp, mask, 0, {file, line});
}

// The lanes of the caller's warp that have not exited. The emulator has no notion of lanes
// "currently converged", so this is the widest mask a warp intrinsic may use at this point.
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::running_scheduler("__activemask", {file, line}).active_mask();
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::shuffle(simt::WarpOp::kShfl, mask, var, srcLane, width, {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::shuffle(simt::WarpOp::kShflUp, mask, var, static_cast<int>(delta), width,
                       {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::shuffle(simt::WarpOp::kShflDown, mask, var, static_cast<int>(delta), width,
                       {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::shuffle(simt::WarpOp::kShflXor, mask, var, laneMask, width, {file, line});
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(simt::vote(simt::WarpOp::kBallot, mask, predicate, {file, line}));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(simt::vote(simt::WarpOp::kAny, mask, predicate, {file, line}));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(simt::vote(simt::WarpOp::kAll, mask, predicate, {file, line}));
}

// ------------------------------------------------------------------------------------------------
// Float math. glibc's math.h already declares some of these names (extern "C", noexcept) without
// defining them, so all are defined with the same linkage. The fast approximations (__expf, ...)
// return the correctly rounded libm value, which lies within the GPU's error bound.

extern "C" {
inline float __expf(float x) noexcept { return expf(x); }
inline float __exp10f(float x) noexcept { return exp10f(x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float __log2f(float x) noexcept { return log2f(x); }
inline float __log10f(float x) noexcept { return log10f(x); }
inline float __sinf(float x) noexcept { return sinf(x); }
inline float __cosf(float x) noexcept { return cosf(x); }
inline float __tanf(float x) noexcept { return tanf(x); }
inline float __powf(float x, float y) noexcept { return powf(x, y); }
inline float __fdividef(float x, float y) noexcept { return x / y; }
inline float __frcp_rn(float x) noexcept { return 1.0f / x; }
inline float __fsqrt_rn(float x) noexcept { return sqrtf(x); }
inline float __fmaf_rn(float x, float y, float z) noexcept { return fmaf(x, y, z); }
inline float __fmul_rn(float x, float y) noexcept { return x * y; }
inline float __fadd_rn(float x, float y) noexcept { return x + y; }
inline float __fsub_rn(float x, float y) noexcept { return x - y; }
inline float __fdiv_rn(float x, float y) noexcept { return x / y; }
inline float __saturatef(float x) noexcept { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float rsqrtf(float x) noexcept { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) noexcept { return 1.0 / sqrt(x); }
inline int __float2int_rn(float x) noexcept { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) noexcept { return static_cast<int>(x); }
inline unsigned __float2uint_rn(float x) noexcept { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) noexcept { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) noexcept { return static_cast<float>(x); }

// Bit reinterpretation.
inline float __int_as_float(int x) noexcept {
  return simt::from_lane_bits<float>(static_cast<std::uint32_t>(x));
}
inline int __float_as_int(float x) noexcept { return static_cast<int>(simt::to_lane_bits(x)); }
inline float __uint_as_float(unsigned x) noexcept { return simt::from_lane_bits<float>(x); }
inline unsigned __float_as_uint(float x) noexcept {
  return static_cast<unsigned>(simt::to_lane_bits(x));
}
inline double __longlong_as_double(long long x) noexcept {
  return simt::from_lane_bits<double>(static_cast<std::uint64_t>(x));
}
inline long long __double_as_longlong(double x) noexcept {
  return static_cast<long long>(simt::to_lane_bits(x));
}

// Bit manipulation.
inline int __popc(unsigned x) noexcept { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) noexcept { return __builtin_popcountll(x); }
inline int __clz(int x) noexcept { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) noexcept {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) noexcept { return __builtin_ffs(x); }
inline int __ffsll(long long x) noexcept { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) noexcept {
  unsigned reversed = 0;
  for (int bit = 0; bit < 32; ++bit) reversed |= ((x >> bit) & 1u) << (31 - bit);
  return reversed;
}
}  // extern "C"

// CUDA's integer and floating point min/max overloads (device code may call them unqualified).
// Floating point versions return the other operand when one is NaN, like fminf/fmaxf.
#define SIMT_DEFINE_MIN_MAX(T, MIN_EXPR, MAX_EXPR)      \
  inline T min(const T a, const T b) { return MIN_EXPR; } \
  inline T max(const T a, const T b) { return MAX_EXPR; }
SIMT_DEFINE_MIN_MAX(int, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(unsigned, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(long, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(unsigned long, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(long long, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(unsigned long long, b < a ? b : a, a < b ? b : a)
SIMT_DEFINE_MIN_MAX(float, fminf(a, b), fmaxf(a, b))
SIMT_DEFINE_MIN_MAX(double, fmin(a, b), fmax(a, b))
#undef SIMT_DEFINE_MIN_MAX

// ------------------------------------------------------------------------------------------------
// Memory: read-only loads and atomics. Fibers never preempt each other, so a plain
// read-modify-write is atomic with respect to every other emulated thread.

template <typename T>
T __ldg(const T* address) {
  return *address;
}

namespace simt {

template <typename T, typename... Allowed>
inline constexpr bool kIsOneOf = (std::is_same_v<T, Allowed> || ...);

template <typename T>
struct Identity {
  using type = T;
};

// Returns the old value and stores update(old). Integer arithmetic wraps as on the GPU (done in
// unsigned so UBSan does not flag the intended overflow).
template <typename T, typename Update>
T atomic_update(T* address, Update update) {
  const T old = *address;
  *address = update(old);
  return old;
}

template <typename T>
T wrapping_add(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}

template <typename T>
using AtomicInteger =
    std::enable_if_t<kIsOneOf<T, int, unsigned, unsigned long long, long long>, T>;
template <typename T>
using AtomicArithmetic =
    std::enable_if_t<kIsOneOf<T, int, unsigned, unsigned long long, float, double>, T>;
template <typename T>
using AtomicExchangeable =
    std::enable_if_t<kIsOneOf<T, int, unsigned, unsigned long long, float>, T>;

}  // namespace simt

template <typename T>
simt::AtomicArithmetic<T> atomicAdd(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T old) { return simt::wrapping_add(old, value); });
}
template <typename T>
simt::AtomicInteger<T> atomicSub(T* address, typename simt::Identity<T>::type value) {
  using U = std::make_unsigned_t<T>;
  return simt::atomic_update(address, [value](T old) {
    return static_cast<T>(static_cast<U>(old) - static_cast<U>(value));
  });
}
template <typename T>
simt::AtomicInteger<T> atomicMax(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
simt::AtomicInteger<T> atomicMin(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
simt::AtomicExchangeable<T> atomicExch(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T) { return value; });
}
template <typename T>
simt::AtomicInteger<T> atomicCAS(T* address, typename simt::Identity<T>::type compare,
                                 typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [=](T old) { return old == compare ? value : old; });
}
template <typename T>
simt::AtomicInteger<T> atomicAnd(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T old) { return static_cast<T>(old & value); });
}
template <typename T>
simt::AtomicInteger<T> atomicOr(T* address, typename simt::Identity<T>::type value) {
  return simt::atomic_update(address, [value](T old) { return static_cast<T>(old | value); });
}

// ------------------------------------------------------------------------------------------------
// fp16 / bf16 arithmetic that cuda_fp16.h and cuda_bf16.h declare device-only. Each result is
// computed in double and rounded once to the 16-bit type.

namespace simt {

inline double widen(__half x) { return static_cast<double>(__half2float(x)); }
inline double widen(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }
inline __half narrow(double x, __half) { return __double2half(x); }
inline __nv_bfloat16 narrow(double x, __nv_bfloat16) { return __double2bfloat16(x); }

// Lane access for the two-element types.
inline __half low_of(__half2 x) { return __low2half(x); }
inline __half high_of(__half2 x) { return __high2half(x); }
inline __half2 pair_of(__half low, __half high) { return __halves2half2(low, high); }
inline __nv_bfloat16 low_of(__nv_bfloat162 x) { return __low2bfloat16(x); }
inline __nv_bfloat16 high_of(__nv_bfloat162 x) { return __high2bfloat16(x); }
inline __nv_bfloat162 pair_of(__nv_bfloat16 low, __nv_bfloat16 high) {
  return __halves2bfloat162(low, high);
}

template <typename Scalar, typename F>
Scalar map_scalar(F f, Scalar x) {
  return narrow(f(widen(x)), Scalar{});
}
template <typename Pair, typename F>
Pair map_pair(F f, Pair x) {
  return pair_of(map_scalar(f, low_of(x)), map_scalar(f, high_of(x)));
}

template <typename Scalar>
Scalar fused_multiply_add(Scalar a, Scalar b, Scalar c) {
  return narrow(std::fma(widen(a), widen(b), widen(c)), Scalar{});
}
template <typename Pair>
Pair fused_multiply_add_pair(Pair a, Pair b, Pair c) {
  return pair_of(fused_multiply_add(low_of(a), low_of(b), low_of(c)),
                 fused_multiply_add(high_of(a), high_of(b), high_of(c)));
}

}  // namespace simt

inline __half __hfma(__half a, __half b, __half c) { return simt::fused_multiply_add(a, b, c); }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return simt::fused_multiply_add(a, b, c);
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return simt::fused_multiply_add_pair(a, b, c);
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return simt::fused_multiply_add_pair(a, b, c);
}

// One elementwise function in its four CUDA spellings: scalar and pair, fp16 and bf16.
#define SIMT_DEFINE_HALF_MATH(SCALAR_NAME, PAIR_NAME, DOUBLE_EXPR)                              \
  inline __half SCALAR_NAME(const __half x) {                                                   \
    return simt::map_scalar([](double v) { return DOUBLE_EXPR; }, x);                           \
  }                                                                                             \
  inline __nv_bfloat16 SCALAR_NAME(const __nv_bfloat16 x) {                                     \
    return simt::map_scalar([](double v) { return DOUBLE_EXPR; }, x);                           \
  }                                                                                             \
  inline __half2 PAIR_NAME(const __half2 x) {                                                   \
    return simt::map_pair([](double v) { return DOUBLE_EXPR; }, x);                             \
  }                                                                                             \
  inline __nv_bfloat162 PAIR_NAME(const __nv_bfloat162 x) {                                     \
    return simt::map_pair([](double v) { return DOUBLE_EXPR; }, x);                             \
  }
SIMT_DEFINE_HALF_MATH(hexp, h2exp, std::exp(v))
SIMT_DEFINE_HALF_MATH(hexp2, h2exp2, std::exp2(v))
SIMT_DEFINE_HALF_MATH(hexp10, h2exp10, std::pow(10.0, v))
SIMT_DEFINE_HALF_MATH(hlog, h2log, std::log(v))
SIMT_DEFINE_HALF_MATH(hlog2, h2log2, std::log2(v))
SIMT_DEFINE_HALF_MATH(hlog10, h2log10, std::log10(v))
SIMT_DEFINE_HALF_MATH(hsqrt, h2sqrt, std::sqrt(v))
SIMT_DEFINE_HALF_MATH(hrsqrt, h2rsqrt, 1.0 / std::sqrt(v))
SIMT_DEFINE_HALF_MATH(hrcp, h2rcp, 1.0 / v)
SIMT_DEFINE_HALF_MATH(htanh, h2tanh, std::tanh(v))
SIMT_DEFINE_HALF_MATH(hsin, h2sin, std::sin(v))
SIMT_DEFINE_HALF_MATH(hcos, h2cos, std::cos(v))
#undef SIMT_DEFINE_HALF_MATH
