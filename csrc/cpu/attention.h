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
#include <climits>
#include <cstdint>

#include "core/params.h"
#include "core/softmax_state.h"

namespace paged_attn::cpu {

// Rows of fp32 workspace are padded to this many floats (one 64-byte cache line) so that every
// row starts aligned and vector loops never need a scalar tail on the workspace side.
constexpr int64_t kFloatsPerLine = 16;
// Accumulator rows are padded to 32 floats: the AVX-512 bf16 path keeps each 32-column chunk of
// an accumulator as two interleaved 16-lane halves (see attention_avx512.cpp).
constexpr int64_t kHeadPadding = 32;

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
  // The attended rows [first_row, end_row) of logical block `block`.
  int32_t first_row(int64_t block, int64_t block_size) const {
    return static_cast<int32_t>(std::max<int64_t>(first_token - block * block_size, 0));
  }
  int32_t end_row(int64_t block, int64_t block_size) const {
    return static_cast<int32_t>(std::min<int64_t>(seq_len - block * block_size, block_size));
  }
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
  int32_t head_size;
  int64_t padded_head_size;      // head_size rounded up to kHeadPadding (workspace row length)
  int64_t padded_block_size;     // block_size rounded up to kFloatsPerLine (score row length)
  bool fp32_gqa_hardware_prefetch;  // fp32 GQA items leave contiguous spans to the hardware
                                    // prefetchers (Intel; see attend_work_item)
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
  float* scores;         // [kv_heads_per_item * group_size, padded_block_size] scores, then
                         // probabilities, of a span; a group's policy calls get its own rows
  float* block;          // [padded_block_size, padded_head_size] one block's K rows in fp32,
                         // or [group_size, padded_block_size] bf16 weights of a block
  SoftmaxState* states;  // [kv_heads_per_item * group_size] running softmax of each query head
  float* packed;         // [kv_heads_per_item * group_size, padded_head_size] room for an
                         // instruction set's own copy of the queries (AMX tile layout)
};

// The query rows of one KV head's GQA group.
template <typename Q>
struct QueryGroup {
  const Q* raw;              // [group_size, head_size], rows raw_head_stride elements apart
  int64_t raw_head_stride;
  const float* converted;    // [group_size, padded_head_size] the same rows in fp32
  int32_t group_size;
  int32_t index;             // position of this KV head among the work item's KV heads
};

// A span: the rows [begin, end) of one physical block that an item processes in one go. Blocks
// longer than a span are processed a span at a time, so that the rows an item touches between
// two visits of the same head (and prefetches ahead) stay as few as in a 32-token block: a
// 128-token NHD block of 8 bf16 heads would otherwise spread each head's rows over 64 pages,
// more than the hardware prefetchers track.
constexpr int32_t kSpanTokens = 32;
// Items with wide rows take spans of 16 tokens (one AMX tile group), so that a span's rows stay
// within kMaxSpanBytes per cache: the current and the prefetched next span, K and V, then fit
// in half of a 2 MiB L2. fp32 with 32 KV heads (16 KiB per token row), 4 x 8192 tokens, timed
// alternately in one process: 96 -> 81 ms.
constexpr int32_t kNarrowSpanTokens = 16;
constexpr int64_t kMaxSpanBytes = 256 * 1024;

// Tokens per span for an item that reads `row_bytes` of each token row of a cache.
inline int32_t span_tokens(int64_t row_bytes) {
  return row_bytes * kSpanTokens <= kMaxSpanBytes ? kSpanTokens : kNarrowSpanTokens;
}

struct Span {
  int64_t block = -1;     // logical block; -1 once the item has no span left
  int64_t physical = -1;  // its physical block
  int32_t begin = 0;      // first row of the span within the block
  int32_t end = 0;        // one past its last row
  bool valid() const { return block >= 0; }
};

// The K (or V) rows of one KV head inside one span of a physical block.
template <typename KV>
struct BlockRows {
  const KV* rows;       // [block_size, head_size] of the block, rows token_stride elements apart
  const KV* next_rows;  // row `next.begin` of the span the item reads next (same head), or nullptr
  int64_t token_stride;
  int32_t begin;        // first attended row of the span
  int32_t end;          // one past the last attended row of the span
};

// The rows of the span an item reads next, to prefetch the next span's row i while row
// begin + i of the current span is processed: that spreads the prefetches evenly over the
// work. Only the first cache line of a row is requested: it starts the page walk and the
// hardware stream for that row, which the L2 streamer then completes without holding one of
// the core's few L1 miss buffers per line (prefetching every line measured slower for fp32
// rows).
struct NextRows {
  const char* first;  // first row of the next span, or nullptr when there is none
  int64_t stride;     // bytes from one row to the next
  int32_t begin;      // first row of the current span

  void prefetch(int64_t token) const {
    if (first) __builtin_prefetch(first + (token - begin) * stride, /*rw=*/0, /*locality=*/2);
  }
};

template <typename KV>
NextRows next_rows(const BlockRows<KV>& block) {
  return {reinterpret_cast<const char*>(block.next_rows),
          block.token_stride * static_cast<int64_t>(sizeof(KV)), block.begin};
}

// The bytes of the next span that an item reads from one cache: `runs` runs of `run_bytes`
// bytes, `run_stride` apart. When the item's heads lie side by side in a token row (NHD), each
// row of the span is one run; when the rows are dense as well and the item has every head, the
// whole span is a single run. Empty when the heads are apart (HND): the kernels then prefetch
// row by row (NextRows).
struct ByteRange {
  const char* first = nullptr;
  int64_t run_bytes = 0;
  int64_t run_stride = 0;
  int64_t runs = 0;

  int64_t lines() const { return runs * ((run_bytes + 63) / 64); }
  // The `index`-th of `slices` parts: whole runs when there are several, else equal byte
  // ranges aligned to cache lines.
  ByteRange slice(int64_t index, int64_t slices) const {
    if (!first) return {};
    if (runs > 1) {
      const int64_t begin = runs * index / slices;
      return {first + begin * run_stride, run_bytes, run_stride, runs * (index + 1) / slices - begin};
    }
    const int64_t begin = run_bytes * index / slices / 64 * 64;
    return {first + begin, run_bytes * (index + 1) / slices - begin, 0, 1};
  }
};

template <typename KV>
ByteRange next_span_range(const KV* cache, const CacheLayout& layout, const Span& next,
                          int32_t first_head, int32_t item_heads) {
  if (!next.valid() || layout.head_stride != layout.head_size) return {};
  const int64_t element = sizeof(KV);
  const int64_t rows = next.end - next.begin;
  const int64_t run = int64_t{item_heads} * layout.head_size;
  const char* first = reinterpret_cast<const char*>(cache + layout.offset(next.physical, next.begin, first_head));
  if (run == layout.token_stride) return {first, rows * run * element, 0, 1};
  return {first, run * element, layout.token_stride * element, rows};
}

// Prefetches the lines of up to two byte ranges a few at a time, in ascending order, as the
// kernels call step() from their inner loops. A core can only wait on a handful of L1 misses at
// once (its fill buffers); a burst of prefetches would stall the pipeline until they drain,
// serialising memory and compute, whereas a steady trickle keeps both busy. The ascending
// order also lets the L2 streamer run ahead within each page. Lines go to L1 (prefetcht0),
// which measured a little faster than L2-only hints.
class PrefetchStream {
 public:
  // Every line is requested: prefetching every other line (leaving the rest to the adjacent-
  // line and streamer prefetchers) measured slower here.
  static constexpr int64_t kPrefetchStride = 64;
  PrefetchStream() = default;
  PrefetchStream(ByteRange first, ByteRange second, int64_t expected_steps) {
    ranges_[0] = first;
    ranges_[1] = second;
    const int64_t lines = first.lines() + second.lines();
    lines_per_step_ = expected_steps > 0 ? (lines + expected_steps - 1) / expected_steps : lines;
    range_ = -1;
    next_range();
  }

  // Prefetches the lines of `count` steps. The kernels call this from their inner loops, so
  // it is kept to a compare and an add per line.
  void step(int64_t count = 1) {
    for (int64_t lines = count * lines_per_step_; lines > 0 && cursor_; --lines) {
      __builtin_prefetch(cursor_, /*rw=*/0, /*locality=*/3);
      cursor_ += kPrefetchStride;
      if (cursor_ >= run_end_) next_run();
    }
  }
  // Issues whatever the steps did not reach.
  void finish() {
    lines_per_step_ = INT64_MAX;
    step();
  }

 private:
  // Moves the cursor to the start of the next run, or of the next range; nullptr at the end.
  void next_run() {
    const ByteRange& range = ranges_[range_];
    if (++run_ < range.runs) {
      cursor_ = range.first + run_ * range.run_stride;
      run_end_ = cursor_ + range.run_bytes;
    } else {
      next_range();
    }
  }
  void next_range() {
    cursor_ = nullptr;
    while (++range_ < 2) {
      const ByteRange& range = ranges_[range_];
      if (range.first && range.runs > 0 && range.run_bytes > 0) {
        run_ = 0;
        cursor_ = range.first;
        run_end_ = cursor_ + range.run_bytes;
        return;
      }
    }
  }

  ByteRange ranges_[2];
  int range_ = 2;                  // the range being prefetched; 2 once both are done
  int64_t run_ = 0;                // the run of that range
  const char* cursor_ = nullptr;   // the next line to request; nullptr when none is left
  const char* run_end_ = nullptr;  // one past the run's last byte
  int64_t lines_per_step_ = 0;
};

// `total` prefetch steps spread over `parts` calls in order: call i takes total / parts, and
// one more for i < total % parts. Made once, outside the loop whose calls it spreads, so that
// the loop divides nothing (two 64-bit divisions per head-dimension step had cost bf16 scores
// a third of their time).
struct StepShare {
  int32_t each;
  int32_t extra;
  StepShare(int32_t total, int32_t parts) : each(total / parts), extra(total % parts) {}
  int32_t operator[](int32_t index) const { return each + (index < extra ? 1 : 0); }
};

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
// How the AVX-512 variant runs bf16 scores and value sums: without AMX, on the AMX tiles
// (only when cpu_supports_amx()), or on the software model of the tiles (tests).
enum class AmxMode { kNone, kHardware, kEmulated };
ItemKernel avx512_item_kernel(ScalarKind query, ScalarKind cache, AmxMode tiles);

}  // namespace paged_attn::cpu
