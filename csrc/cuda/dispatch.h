// Compile-time switches for the torch-free launchers, flash-attention style but without macros:
// each function maps a runtime value to a C++ type or constant, calls the lambda with it and
// returns what the lambda returns (typically the kernel instantiation to launch), e.g.
//
//   const auto kernel = with_value_type<CudaElementTypes>(kind, [&](auto tag) {
//     using scalar_t = typename decltype(tag)::type;
//     return &my_kernel<scalar_t>;
//   });
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "core/dtype_dispatch.h"

namespace paged_attn::launch {

// The CUDA kernels' element types, for the switches of core/dtype_dispatch.h.
using CudaElementTypes = ElementTypes<float, __half, __nv_bfloat16, __nv_fp8_e4m3>;

// A set of int template arguments that a kernel is instantiated for.
template <int... Values>
struct IntSet {
  static bool contains(int value) { return ((value == Values) || ...); }
  static std::string describe() {
    std::string text;
    ((text += (text.empty() ? "" : ", ") + std::to_string(Values)), ...);
    return text;
  }
};

// Calls fn(std::integral_constant<int, V>) for the V of the set equal to `value`. For a value
// outside the set it returns a value-initialized result (nullptr for a kernel pointer); callers
// check IntSet::contains first and raise a readable error.
template <int First, int... Rest, typename Fn>
auto with_int(int value, IntSet<First, Rest...>, Fn&& fn)
    -> decltype(fn(std::integral_constant<int, First>{})) {
  if (value == First) return fn(std::integral_constant<int, First>{});
  if constexpr (sizeof...(Rest) > 0) {
    return with_int(value, IntSet<Rest...>{}, std::forward<Fn>(fn));
  } else {
    return {};
  }
}

}  // namespace paged_attn::launch
