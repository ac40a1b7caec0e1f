// Internal interface of the CPU paged_attention kernel, shared by the driver (attention.cpp)
// and the instruction-set-specific work-item kernels (attention_portable.cpp,
// attention_avx512.cpp). Torch-free.
//
// How a call is split: a *work item* is one (sequence, partition of its context, chunk of
// consecutive KV heads). An item reads every K/V row of its blocks and heads exactly once and
// serves all query heads of those KV heads' GQA groups from that one read. Items are handed out
// dynamically to the at::parallel_for workers, so one long sequence still keeps both cores busy
// (through its partitions) and sequences of unequal length balance out. When a sequence has
// more than one partition, each item leaves (softmax state, unnormalised accumulator) per query
// head in a small scratch, and a combine step merges them with SoftmaxState::merge.
//
// The AVX-512 translation unit compiles with a wider target than the rest. It includes this
// header before it switches target, so the inline helpers here are always compiled for the
// baseline ISA and the linker cannot merge an AVX-512 copy of them into portable code.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/params.h"
#include "core/softmax_state.h"

namespace paged_attn::cpu {

// Rows of fp32 workspace are padded to this many floats (one 64-byte cache line) so that every
// row starts aligned and vector loops never need a scalar tail on the workspace side.
constexpr int64_t kFloatsPerLine = 16;

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The (sequence, partition, KV-head chunk) a work item index stands for. Items are numbered
// sequence-major, then partition, then chunk, so neighbouring items (run at the same time by
// the two threads) read neighbouring memory of the same sequence.
struct WorkItem {
  int32_t seq;
  int32_t partition;
  int32_t first_kv_head;
  int32_t end_kv_head;  // one past the last KV head of the item
};

// The tokens a sequence attends: [first_token, seq_len), covering logical blocks
// [first_block, end_block). With a sliding window, earlier blocks are never read.
struct AttendedRange {
  int64_t seq_len;
  int64_t first_token;
  int64_t first_block;
  int64_t end_block;

  AttendedRange(int64_t length, int64_t sliding_window, int64_t block_size) : seq_len(length) {
    first_token = sliding_window > 0 ? std::max<int64_t>(0, length - sliding_window) : 0;
    first_block = first_token / block_size;
    end_block = (length + block_size - 1) / block_size;
  }
  int64_t num_blocks() const { return end_block - first_block; }
};

// How one call is split into work items, and where partial results go. Made once per call by
// the driver, read by every item.
struct AttentionPlan {
  int32_t group_size;            // query heads per KV head (the GQA ratio)
  int32_t kv_heads_per_item;     // KV heads that one item handles together
  int32_t kv_head_chunks;        // ceil(num_kv_heads / kv_heads_per_item)
  int32_t blocks_per_partition;  // logical blocks per partition of a sequence's attended range
  int32_t partitions_per_seq;    // enough partitions for the longest attended range
  int64_t num_items;             // num_seqs * partitions_per_seq * kv_head_chunks
  int64_t padded_head_size;      // head_size rounded up to kFloatsPerLine (workspace row length)
  int64_t padded_block_size;     // block_size rounded up to kFloatsPerLine (score row length)
  float* partial_accumulators;   // [num_seqs, num_heads, partitions_per_seq, padded_head_size]
                                 // unnormalised outputs; nullptr when partitions_per_seq == 1
  SoftmaxState* partial_states;  // [num_seqs, num_heads, partitions_per_seq]; nullptr likewise

  WorkItem item(int64_t index) const {
    const int32_t chunk = static_cast<int32_t>(index % kv_head_chunks);
    const int64_t seq_partition = index / kv_head_chunks;
    WorkItem work;
    work.seq = static_cast<int32_t>(seq_partition / partitions_per_seq);
    work.partition = static_cast<int32_t>(seq_partition % partitions_per_seq);
    work.first_kv_head = chunk * kv_heads_per_item;
    work.end_kv_head = work.first_kv_head + kv_heads_per_item;  // clamped by the caller
    return work;
  }
  // Offset of (seq, query head, partition) in partial_states; times padded_head_size in
  // partial_accumulators.
  int64_t partial_index(int64_t seq, int64_t head, int64_t num_heads, int64_t partition) const {
    return (seq * num_heads + head) * partitions_per_seq + partition;
  }
};

// Per-thread fp32 scratch of a work item; the driver keeps one per worker thread and reuses it
// across calls, so the hot path allocates nothing.
struct Workspace {
  float* queries;        // [kv_heads_per_item * group_size, padded_head_size] fp32 queries
  float* accumulators;   // [kv_heads_per_item * group_size, padded_head_size] sum_t p_t * v_t
  float* scores;         // [group_size, padded_block_size] scores, then probabilities, of a block
  float* row;            // [padded_head_size] one K or V row converted to fp32
  SoftmaxState* states;  // [kv_heads_per_item * group_size] running softmax of each query head
};

// The query rows of one KV head's GQA group.
template <typename Q>
struct QueryGroup {
  const Q* raw;              // [group_size, head_size], rows raw_head_stride elements apart
  int64_t raw_head_stride;
  const float* converted;    // [group_size, padded_head_size] the same rows in fp32
  int32_t group_size;
};

// The K (or V) rows of one KV head inside one physical block.
template <typename KV>
struct BlockRows {
  const KV* rows;       // [block_size, head_size], rows token_stride elements apart
  const KV* next_rows;  // the same rows of the next block this item reads, or nullptr
  int64_t token_stride;
  int32_t begin;        // first attended token of the block
  int32_t end;          // one past the last attended token of the block
};

// Asks the memory system for `bytes` starting at `address` ahead of use. Data goes to L2 (not
// L1): the next block is a whole block's worth of work away, long enough for L1 to evict it.
inline void prefetch_bytes(const void* address, int64_t bytes) {
  const char* line = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    __builtin_prefetch(line + offset, /*rw=*/0, /*locality=*/2);
  }
}

// Writes `factor * source[0..count)` into `destination` in its storage type, rounding to
// nearest even as tensor.to(dtype) does.
template <typename T>
inline void store_row(T* destination, const float* source, int64_t count, float factor) {
  for (int64_t i = 0; i < count; ++i) destination[i] = static_cast<T>(source[i] * factor);
}

// The kernel of one work item for one instruction set and one (query, cache) dtype pair.
using ItemKernel = void (*)(const PagedAttentionParams& params, const AttentionPlan& plan,
                            int64_t item_index, const Workspace& workspace);

// Selection of the item kernel for a dtype pair. The AVX-512 variant must only be called on a
// CPU that has AVX-512 F/BW/VL/BF16 (see isa.h).
ItemKernel portable_item_kernel(ScalarKind query, ScalarKind cache);
ItemKernel avx512_item_kernel(ScalarKind query, ScalarKind cache);

}  // namespace paged_attn::cpu
