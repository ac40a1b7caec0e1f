// Compile-time switches for the torch-free launchers, flash-attention style but without macros:
// each function maps a runtime value to a C++ type or constant, calls the lambda with it and
// returns what the lambda returns (typically the kernel instantiation to launch), e.g.
//
//   const auto kernel = with_value_type(kind, [&](auto tag) {
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

#include "core/params.h"

namespace paged_attn::launch {

template <typename T>
struct TypeTag {
  using type = T;
};

// The C++ type of a query / key / value / output element: float, __half or __nv_bfloat16.
template <typename Fn>
decltype(auto) with_value_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32: return fn(TypeTag<float>{});
    case ScalarKind::kFloat16: return fn(TypeTag<__half>{});
    case ScalarKind::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    case ScalarKind::kFloat8E4M3: break;
  }
  throw std::invalid_argument("paged_attn: fp8 e4m3 is a cache dtype, not a query/key/value dtype");
}

// The (value, cache) element types of an op whose cache holds either the value type or fp8.
template <typename Fn>
decltype(auto) with_value_and_cache_types(ScalarKind value_kind, ScalarKind cache_kind, Fn&& fn) {
  return with_value_type(value_kind, [&](auto value_tag) -> decltype(auto) {
    using value_t = typename decltype(value_tag)::type;
    if (cache_kind == ScalarKind::kFloat8E4M3) return fn(value_tag, TypeTag<__nv_fp8_e4m3>{});
    return fn(value_tag, TypeTag<value_t>{});
  });
}

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
