// CPU kernels of the cache ops: write_kv, copy_blocks and swap_blocks.
//
// All three are memory copies. They are expressed as a list of (source, destination, bytes)
// runs, with runs that continue each other merged, so a dense layout turns whole blocks, and
// consecutive blocks, into single copies. The runs' total byte count is then split evenly over
// the at::parallel_for workers (a run may be cut between two workers), because one core alone
// cannot saturate the memory bus. Copies much larger than the caches use non-temporal stores
// on AVX-512 CPUs (stream_copy). fp8 write_kv is the exception: it quantizes element by element
// through c10's conversion, the one `tensor.to(torch.float8_e4m3fn)` uses.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/dtype_dispatch.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace paged_attn::cpu {
namespace {

// Each worker task copies at least this many bytes, so small copies stay on one thread.
constexpr int64_t kMinBytesPerTask = 256 * 1024;
// Ops that copy at least this many bytes stream their stores past the caches: the data is too
// large to stay cached for whoever reads it next, and ordinary stores would first read every
// destination line (read-for-ownership), a third more memory traffic. Smaller copies, such as
// one decode step's write_kv that paged_attention reads right after, keep ordinary stores.
constexpr int64_t kStreamingBytes = 4 * 1024 * 1024;

// Copies `bytes` with AVX-512 non-temporal stores, the destination's first and last partial
// lines with memcpy. The stores are weakly ordered: the caller issues _mm_sfence before the
// data is handed on. Scattered 32 KiB copies on AMD Zen 5, 2 threads: 20.9 -> 23.6 GB/s
// against glibc's memcpy (2 KiB pieces: 13.6 -> 16.3 GB/s). Only called when the selected
// instruction set is not "portable", which implies AVX-512 (isa.h).
__attribute__((target("avx512f"))) void stream_copy(char* destination, const char* source,
                                                    int64_t bytes) {
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(destination) % 64);
  int64_t offset = std::min<int64_t>(bytes, misalignment == 0 ? 0 : 64 - misalignment);
  std::memcpy(destination, source, offset);
  for (; offset + 64 <= bytes; offset += 64) {
    const __m512i line = _mm512_loadu_si512(source + offset);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(destination + offset), line);
  }
  std::memcpy(destination + offset, source + offset, bytes - offset);
}

int64_t element_bytes(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat32: return 4;
    case ScalarKind::kFloat16:
    case ScalarKind::kBFloat16: return 2;
    case ScalarKind::kFloat8E4M3: return 1;
  }
  return 0;
}

struct CopyRun {
  const char* source;
  char* destination;
  int64_t bytes;
  int64_t start;  // offset of this run in the concatenation of all runs
};

// The runs of one op call. Kept per calling thread and reused, so steady-state calls do not
// allocate.
class CopyList {
 public:
  // Forgets all runs but keeps the storage.
  void clear() {
    runs_.clear();
    total_ = 0;
  }

  void add(const void* source, void* destination, int64_t bytes) {
    const char* from = static_cast<const char*>(source);
    char* to = static_cast<char*>(destination);
    if (!runs_.empty()) {
      CopyRun& last = runs_.back();
      if (last.source + last.bytes == from && last.destination + last.bytes == to) {
        last.bytes += bytes;
        total_ += bytes;
        return;
      }
    }
    runs_.push_back({from, to, bytes, total_});
    total_ += bytes;
  }

  // Adds the copy of whole block `source_block` of `source` into block `destination_block` of
  // `destination`: one run for a dense block, else one per contiguous row, visited in address
  // order so that rows which happen to be adjacent (an HND view) still merge.
  void add_block(const char* source, const CacheLayout& source_layout, int64_t source_block,
                 char* destination, const CacheLayout& destination_layout,
                 int64_t destination_block, int64_t bytes_per_element) {
    const int64_t row_bytes = source_layout.head_size * bytes_per_element;
    if (source_layout.block_is_dense() && destination_layout.block_is_dense()) {
      add(source + source_layout.offset(source_block, 0, 0) * bytes_per_element,
          destination + destination_layout.offset(destination_block, 0, 0) * bytes_per_element,
          row_bytes * source_layout.block_size * source_layout.num_kv_heads);
      return;
    }
    const bool heads_outer = source_layout.head_stride > source_layout.token_stride;
    const int64_t outer_count = heads_outer ? source_layout.num_kv_heads : source_layout.block_size;
    const int64_t inner_count = heads_outer ? source_layout.block_size : source_layout.num_kv_heads;
    for (int64_t outer = 0; outer < outer_count; ++outer) {
      for (int64_t inner = 0; inner < inner_count; ++inner) {
        const int64_t token = heads_outer ? inner : outer;
        const int64_t head = heads_outer ? outer : inner;
        add(source + source_layout.offset(source_block, token, head) * bytes_per_element,
            destination + destination_layout.offset(destination_block, token, head) * bytes_per_element,
            row_bytes);
      }
    }
  }

  // Copies every run, the total split evenly over the workers. The instruction-set choice
  // (PAGED_ATTN_CPU_ISA, see isa.h) also decides the stores: "portable" always uses memcpy.
  void run() const {
    if (total_ == 0) return;
    const bool streaming = total_ >= kStreamingBytes && selected_isa() != CpuIsa::kPortable;
    const int64_t tasks = std::clamp<int64_t>(total_ / kMinBytesPerTask, 1, at::get_num_threads());
    at::parallel_for(0, tasks, /*grain_size=*/1, [&](int64_t first_task, int64_t end_task) {
      for (int64_t task = first_task; task < end_task; ++task) {
        copy_range(total_ * task / tasks, total_ * (task + 1) / tasks, streaming);
      }
      if (streaming) _mm_sfence();
    });
  }

 private:
  // Copies bytes [begin, end) of the concatenated runs.
  void copy_range(int64_t begin, int64_t end, bool streaming) const {
    auto run = std::upper_bound(runs_.begin(), runs_.end(), begin,
                                [](int64_t offset, const CopyRun& r) { return offset < r.start; });
    for (--run; run != runs_.end() && run->start < end; ++run) {
      const int64_t from = std::max(begin, run->start) - run->start;
      const int64_t to = std::min(end, run->start + run->bytes) - run->start;
      if (streaming) {
        stream_copy(run->destination + from, run->source + from, to - from);
      } else {
        std::memcpy(run->destination + from, run->source + from, to - from);
      }
    }
  }

  std::vector<CopyRun> runs_;
  int64_t total_ = 0;
};

// A fresh (empty) run list that reuses the calling thread's storage.
CopyList& thread_copy_list() {
  thread_local CopyList list;
  list.clear();
  return list;
}

// fp8 write: each element becomes Float8(x / scale) with the division in float32.
template <typename T>
void quantize_tokens(const WriteKVParams& params) {
  const int64_t heads = params.key_layout.num_kv_heads;
  const int64_t head_size = params.key_layout.head_size;
  const int64_t block_size = params.key_layout.block_size;
  const int64_t grain = std::max<int64_t>(1, 4096 / (heads * head_size));
  at::parallel_for(0, params.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t slot = params.slot_mapping[token];
      if (slot < 0) continue;
      for (const auto& [input, token_stride, head_stride, cache, layout, scale] :
           {std::tuple(params.key, params.key_token_stride, params.key_head_stride,
                       params.key_cache, &params.key_layout, *params.k_scale),
            std::tuple(params.value, params.value_token_stride, params.value_head_stride,
                       params.value_cache, &params.value_layout, *params.v_scale)}) {
        for (int64_t head = 0; head < heads; ++head) {
          const T* source = static_cast<const T*>(input) + token * token_stride + head * head_stride;
          Float8* destination = static_cast<Float8*>(cache) +
                                layout->offset(slot / block_size, slot % block_size, head);
          for (int64_t d = 0; d < head_size; ++d) {
            destination[d] = Float8(static_cast<float>(source[d]) / scale);
          }
        }
      }
    }
  });
}

}  // namespace

void run_write_kv(const WriteKVParams& params) {
  if (params.key_layout.dtype == ScalarKind::kFloat8E4M3) {
    with_value_type<CpuElementTypes>(params.input_dtype, [&](auto input_tag) {
      quantize_tokens<typename decltype(input_tag)::type>(params);
    });
    return;
  }
  const int64_t bytes_per_element = element_bytes(params.input_dtype);
  const int64_t block_size = params.key_layout.block_size;
  const int64_t heads = params.key_layout.num_kv_heads;
  const int64_t row_bytes = params.key_layout.head_size * bytes_per_element;
  // All keys, then all values: consecutive tokens of one block then continue each other in
  // both the input and the cache, and merge into one run per block.
  CopyList& copies = thread_copy_list();
  for (const auto& [input, token_stride, head_stride, cache, layout] :
       {std::tuple(params.key, params.key_token_stride, params.key_head_stride, params.key_cache,
                   &params.key_layout),
        std::tuple(params.value, params.value_token_stride, params.value_head_stride,
                   params.value_cache, &params.value_layout)}) {
    for (int64_t token = 0; token < params.num_tokens; ++token) {
      const int64_t slot = params.slot_mapping[token];
      if (slot < 0) continue;
      for (int64_t head = 0; head < heads; ++head) {
        copies.add(static_cast<const char*>(input) + (token * token_stride + head * head_stride) * bytes_per_element,
                   static_cast<char*>(cache) +
                       layout->offset(slot / block_size, slot % block_size, head) * bytes_per_element,
                   row_bytes);
      }
    }
  }
  copies.run();
}

void run_copy_blocks(const CopyBlocksParams& params) {
  const int64_t bytes_per_element = element_bytes(params.key_layout.dtype);
  CopyList& copies = thread_copy_list();
  for (size_t layer = 0; layer < params.key_caches.size(); ++layer) {
    for (const auto& [cache, layout] : {std::pair(params.key_caches[layer], &params.key_layout),
                                        std::pair(params.value_caches[layer], &params.value_layout)}) {
      char* base = static_cast<char*>(cache);
      for (int64_t pair = 0; pair < params.num_pairs; ++pair) {
        copies.add_block(base, *layout, params.block_mapping[2 * pair], base, *layout,
                         params.block_mapping[2 * pair + 1], bytes_per_element);
      }
    }
  }
  copies.run();
}

void run_swap_blocks(const SwapBlocksParams& params) {
  CopyList& copies = thread_copy_list();
  for (int64_t pair = 0; pair < params.num_pairs; ++pair) {
    copies.add_block(static_cast<const char*>(params.src), params.src_layout,
                     params.block_mapping[2 * pair], static_cast<char*>(params.dst),
                     params.dst_layout, params.block_mapping[2 * pair + 1], params.element_bytes);
  }
  copies.run();
}

}  // namespace paged_attn::cpu
