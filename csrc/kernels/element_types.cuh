// Element types of the CUDA kernels: conversions to and from float, and the 16-byte vector that
// every bulk global load and store moves.
//
// The cache element type is float, __half, __nv_bfloat16 (the query's type) or __nv_fp8_e4m3.
// torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__, so every conversion here is an
// explicit intrinsic; the same functions run on the emulator through the host fp16/bf16/fp8
// headers.
#pragma once

#include "kernels/kcompat.cuh"

#include <cstdint>

namespace paged_attn::kernels {

// One 16-byte global memory transaction per thread (ld.global.v4 / st.global.v4).
using Vec16 = uint4;
inline constexpr int kVecBytes = 16;

// How many elements of T one Vec16 holds: 4 floats, 8 halves, 16 fp8 values.
template <typename T>
inline constexpr int kElemsPerVec = kVecBytes / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E4M3)));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
// Saturating, round to nearest even: bit-identical to torch's float32 -> float8_e4m3fn.
template <>
__device__ __forceinline__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float x) {
  __nv_fp8_e4m3 result;
  result.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  return result;
}

// Unpacks the kElemsPerVec<T> elements of one 16-byte vector into floats.
template <typename T>
__device__ __forceinline__ void unpack_to_float(const Vec16& packed, float* out) {
  const T* elems = reinterpret_cast<const T*>(&packed);
#pragma unroll
  for (int e = 0; e < kElemsPerVec<T>; ++e) out[e] = to_float(elems[e]);
}

__device__ __forceinline__ Vec16 load_vec(const void* address) {
  return *reinterpret_cast<const Vec16*>(address);
}

__device__ __forceinline__ void store_vec(void* address, const Vec16& value) {
  *reinterpret_cast<Vec16*>(address) = value;
}

}  // namespace paged_attn::kernels
