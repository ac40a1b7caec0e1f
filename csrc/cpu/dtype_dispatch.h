// Compile-time dtype switches for the CPU kernels, written as lambdas that receive a typed tag.
//
// The storage types are c10's 16- and 8-bit float classes (header-only, no ATen): their float
// conversions are the ones PyTorch itself uses, so a kernel that writes through them rounds
// exactly as `tensor.to(dtype)` does.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <stdexcept>
#include <type_traits>

#include "core/params.h"

namespace paged_attn::cpu {

using Half = c10::Half;
using BFloat16 = c10::BFloat16;
using Float8 = c10::Float8_e4m3fn;

// A value that carries a type, so a generic lambda can recover it with decltype.
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type T of a query (and output) dtype.
template <typename Fn>
decltype(auto) dispatch_query_dtype(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32: return fn(TypeTag<float>{});
    case ScalarKind::kFloat16: return fn(TypeTag<Half>{});
    case ScalarKind::kBFloat16: return fn(TypeTag<BFloat16>{});
    default: throw std::invalid_argument("paged_attn: fp8 is a cache dtype, not a query dtype");
  }
}

// Calls fn(TypeTag<Q>{}, TypeTag<KV>{}) for a query dtype and a cache dtype. The cache holds
// either the query's own dtype or fp8 e4m3, so six pairs exist.
template <typename Fn>
decltype(auto) dispatch_query_and_cache_dtypes(ScalarKind query, ScalarKind cache, Fn&& fn) {
  return dispatch_query_dtype(query, [&](auto query_tag) {
    using Q = typename decltype(query_tag)::type;
    if (cache == ScalarKind::kFloat8E4M3) return fn(query_tag, TypeTag<Float8>{});
    if (cache != query) throw std::invalid_argument("paged_attn: cache dtype must match query");
    return fn(query_tag, TypeTag<Q>{});
  });
}

}  // namespace paged_attn::cpu
