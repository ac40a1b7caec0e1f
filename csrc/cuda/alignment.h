// Host checks that a tensor suits the kernels' 16-byte vector accesses: base pointer, strides
// and row length must all be multiples of 16 bytes. Shared by the torch-free launchers.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/params.h"

namespace paged_attn::launch {

inline constexpr int64_t kVectorAlignment = 16;

struct ByteExtent {
  const char* what;  // e.g. "token stride"
  int64_t bytes;
};

// Empty when `name` can be accessed with 16-byte vectors, else a message naming the first
// misaligned base address or extent.
inline std::string vector_alignment_error(const char* name, const void* base,
                                          std::initializer_list<ByteExtent> extents) {
  const std::string prefix =
      "CUDA path needs 16-byte aligned cache strides and base pointers (it moves 16-byte "
      "vectors): ";
  const auto address = reinterpret_cast<std::uintptr_t>(base);
  if (address % kVectorAlignment != 0) {
    return prefix + name + "'s data pointer is " + std::to_string(address % kVectorAlignment) +
           " bytes past a 16-byte boundary";
  }
  for (const ByteExtent& extent : extents) {
    if (extent.bytes % kVectorAlignment != 0) {
      return prefix + name + " has " + extent.what + " " + std::to_string(extent.bytes) + " bytes";
    }
  }
  return {};
}

inline int64_t element_bytes(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat32: return 4;
    case ScalarKind::kFloat16:
    case ScalarKind::kBFloat16: return 2;
    case ScalarKind::kFloat8E4M3: return 1;
  }
  return 4;
}

// The check for a paged cache [num_blocks, block_size, num_kv_heads, head_size].
inline std::string cache_alignment_error(const char* name, const void* base,
                                         const CacheLayout& layout) {
  const int64_t bytes = element_bytes(layout.dtype);
  return vector_alignment_error(name, base,
                                {{"block stride", layout.block_stride * bytes},
                                 {"token stride", layout.token_stride * bytes},
                                 {"head stride", layout.head_stride * bytes},
                                 {"row length (head_size * element size)", layout.head_size * bytes}});
}

}  // namespace paged_attn::launch
