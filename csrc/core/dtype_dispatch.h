// Compile-time dtype switches shared by the CPU kernels and the CUDA launchers, written as
// lambdas (flash-attention style, without macros). Each backend names its element types once, as
// an ElementTypes list; a switch calls the lambda with a TypeTag of the matching type and returns
// what the lambda returns (a kernel pointer, or nothing):
//
//   with_value_and_cache_types<CudaElementTypes>(query_kind, cache_kind, [](auto q, auto kv) {
//     return &kernel<typename decltype(q)::type, typename decltype(kv)::type>;
//   });
#pragma once

#include <stdexcept>

#include "core/params.h"

namespace paged_attn {

// A value that carries a type, so a generic lambda can recover it with decltype.
template <typename T>
struct TypeTag {
  using type = T;
};

// One backend's C++ type for each ScalarKind.
template <typename Float32T, typename Float16T, typename BFloat16T, typename Float8E4M3T>
struct ElementTypes {
  using Float32 = Float32T;
  using Float16 = Float16T;
  using BFloat16 = BFloat16T;
  using Float8E4M3 = Float8E4M3T;
};

// Calls fn(TypeTag<T>{}) for the type T of a query / key / value / output element.
template <typename Types, typename Fn>
decltype(auto) with_value_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32: return fn(TypeTag<typename Types::Float32>{});
    case ScalarKind::kFloat16: return fn(TypeTag<typename Types::Float16>{});
    case ScalarKind::kBFloat16: return fn(TypeTag<typename Types::BFloat16>{});
    case ScalarKind::kFloat8E4M3: break;
  }
  throw std::invalid_argument("paged_attn: fp8 e4m3 is a cache dtype, not a query/key/value dtype");
}

// Calls fn(TypeTag<Value>{}, TypeTag<Cache>{}) for an op whose cache holds either the value type
// or fp8 e4m3, so six pairs exist.
template <typename Types, typename Fn>
decltype(auto) with_value_and_cache_types(ScalarKind value_kind, ScalarKind cache_kind, Fn&& fn) {
  return with_value_type<Types>(value_kind, [&](auto value_tag) -> decltype(auto) {
    using Value = typename decltype(value_tag)::type;
    if (cache_kind == ScalarKind::kFloat8E4M3) {
      return fn(value_tag, TypeTag<typename Types::Float8E4M3>{});
    }
    if (cache_kind != value_kind) {
      throw std::invalid_argument("paged_attn: the cache dtype must be the value dtype or fp8 e4m3");
    }
    return fn(value_tag, TypeTag<Value>{});
  });
}

}  // namespace paged_attn
