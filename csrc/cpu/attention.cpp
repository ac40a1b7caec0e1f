// The CPU paged_attention driver: plans the work items of a call (see attention.h), runs them
// on the at::parallel_for workers with the item kernel of the selected instruction set, and
// merges the partial results of partitioned sequences.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/attention.h"
#include "cpu/dtype_dispatch.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace paged_attn::cpu {
namespace {

// Work items per worker thread. The last item a worker takes decides when the call ends, so an
// item should be a small share of a worker's time: with 32 items each, the idle tail at the
// end of a call is about 1/32 of it at worst, while every item still streams at least
// kMinPartitionTokens tokens of K/V.
constexpr int64_t kItemsPerWorker = 32;
// Splitting a sequence's KV heads over items costs more than a longer tail: an item with every
// head reads each span as one contiguous range, which the hardware prefetchers stream best, and
// pays its set-up once for all heads. So heads are split only while there are fewer than this
// many items per worker. Timed alternately in one process (2 threads, medians of 15), splitting
// only below 4 instead of below 32 items per worker: 16 x 256 bf16 tokens 2.80 -> 2.23 ms,
// 16 x 512 5.17 -> 3.84 ms, 16 x 256 fp32 4.31 -> 3.08 ms, 4 x 2048 with 32 KV heads
// 14.38 -> 12.86 ms (bf16) and 23.87 -> 21.60 ms (fp32).
constexpr int64_t kItemsPerWorkerBeforeHeadSplit = 4;
// A partition covers at least this many tokens, so the combine step (which touches one
// head_size row per query head and partition) stays negligible next to the K/V reads.
constexpr int64_t kMinPartitionTokens = 256;

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

// Chooses partitions and KV-head chunks so that there are about kItemsPerWorker items per
// worker. Partitions come first: they keep an item's reads contiguous within each block. Only
// when even short partitions leave fewer than kItemsPerWorkerBeforeHeadSplit items per worker
// are a sequence's KV heads split.
AttentionPlan make_plan(const PagedAttentionParams& params, int64_t num_workers) {
  const int64_t block_size = params.key_layout.block_size;
  int64_t total_blocks = 0;
  int64_t longest = 0;
  for (int32_t seq = 0; seq < params.num_seqs; ++seq) {
    const AttendedRange range(params.seq_lens[seq], params.sliding_window, block_size);
    total_blocks += range.num_blocks();
    longest = std::max(longest, range.num_blocks());
  }
  const int64_t wanted_items = num_workers > 1 ? kItemsPerWorker * num_workers : 1;

  AttentionPlan plan{};
  plan.group_size = params.queries_per_kv();
  const int64_t min_partition_blocks = ceil_div(kMinPartitionTokens, block_size);
  const int64_t blocks_per_partition = std::clamp(
      ceil_div(total_blocks, wanted_items), min_partition_blocks, std::max<int64_t>(longest, 1));
  plan.blocks_per_partition = static_cast<int32_t>(blocks_per_partition);
  plan.partitions_per_seq =
      static_cast<int32_t>(std::max<int64_t>(1, ceil_div(longest, blocks_per_partition)));
  plan.kv_heads_per_item = params.num_kv_heads;
  plan.kv_head_chunks = 1;
  const int64_t split_below = num_workers > 1 ? kItemsPerWorkerBeforeHeadSplit * num_workers : 1;
  while (int64_t{params.num_seqs} * plan.partitions_per_seq * plan.kv_head_chunks < split_below &&
         plan.kv_heads_per_item > 1) {
    plan.kv_heads_per_item = static_cast<int32_t>(ceil_div(plan.kv_heads_per_item, 2));
    plan.kv_head_chunks = static_cast<int32_t>(ceil_div(params.num_kv_heads, plan.kv_heads_per_item));
  }
  plan.num_items = int64_t{params.num_seqs} * plan.partitions_per_seq * plan.kv_head_chunks;
  plan.head_size = params.head_size;
  plan.padded_head_size = round_up(params.head_size, kHeadPadding);
  plan.padded_block_size = round_up(block_size, kFloatsPerLine);
  plan.fp32_gqa_hardware_prefetch = cpu_is_intel();
  return plan;
}

// A float buffer that keeps its capacity between calls of the same thread, handed out aligned
// to a cache line. After the first calls of a given shape it never allocates.
class ReusableBuffer {
 public:
  float* floats(int64_t count) {
    const size_t needed = static_cast<size_t>(count + kFloatsPerLine);
    if (storage_.size() < needed) storage_.resize(needed);
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage_.data());
    const uintptr_t aligned = (address + 63) & ~uintptr_t{63};
    return storage_.data() + (aligned - address) / sizeof(float);
  }
  SoftmaxState* states(int64_t count) {
    if (states_.size() < static_cast<size_t>(count)) states_.resize(count);
    return states_.data();
  }

 private:
  std::vector<float> storage_;
  std::vector<SoftmaxState> states_;
};

// The calling worker thread's workspace for items of this plan.
Workspace thread_workspace(const AttentionPlan& plan) {
  thread_local ReusableBuffer buffer;
  const int64_t item_heads = int64_t{plan.kv_heads_per_item} * plan.group_size;
  const int64_t head_rows = item_heads * plan.padded_head_size;
  const int64_t score_floats = item_heads * plan.padded_block_size;
  // workspace.block holds a block of fp32 K rows, or the group's bf16 weights of a block.
  const int64_t block_floats = plan.padded_block_size * std::max<int64_t>(plan.padded_head_size, plan.group_size);
  float* floats = buffer.floats(3 * head_rows + score_floats + block_floats);
  Workspace workspace;
  workspace.queries = floats;
  workspace.accumulators = floats + head_rows;
  workspace.scores = floats + 2 * head_rows;
  workspace.block = workspace.scores + score_floats;
  workspace.states = buffer.states(item_heads);
  workspace.packed = workspace.block + block_floats;
  return workspace;
}

// Merges the partitions of every (sequence, query head) into its output row.
void combine_partitions(const PagedAttentionParams& params, const AttentionPlan& plan) {
  const float value_scale = params.v_scale ? *params.v_scale : 1.0f;
  const int64_t rows = int64_t{params.num_seqs} * params.num_heads;
  with_value_type<CpuElementTypes>(params.query_dtype, [&](auto query_tag) {
    using Q = typename decltype(query_tag)::type;
    at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t seq = row / params.num_heads;
        const int64_t head = row % params.num_heads;
        const int64_t first = plan.partial_index(seq, head, params.num_heads, 0);
        // Partition 0's accumulator becomes the running sum of all partitions.
        float* merged = plan.partial_accumulators + first * plan.padded_head_size;
        SoftmaxState state = plan.partial_states[first];
        for (int32_t partition = 1; partition < plan.partitions_per_seq; ++partition) {
          const SoftmaxState::Rescale rescale = state.merge(plan.partial_states[first + partition]);
          const float* partial = merged + partition * plan.padded_head_size;
          for (int64_t d = 0; d < plan.padded_head_size; ++d) {
            merged[d] = merged[d] * rescale.self + partial[d] * rescale.other;
          }
        }
        Q* out = static_cast<Q*>(params.out) + seq * params.out_seq_stride + head * params.out_head_stride;
        store_row(out, merged, params.head_size, state.inverse_sum() * value_scale);
      }
    });
  });
}

}  // namespace

void run_paged_attention(const PagedAttentionParams& params) {
  if (params.num_seqs == 0) return;
  const CpuIsa isa = selected_isa();
  const AmxMode tiles = isa == CpuIsa::kAmx           ? AmxMode::kHardware
                        : isa == CpuIsa::kAmxEmulated ? AmxMode::kEmulated
                                                      : AmxMode::kNone;
  const ItemKernel kernel = isa == CpuIsa::kPortable
                                ? portable_item_kernel(params.query_dtype, params.key_layout.dtype)
                                : avx512_item_kernel(params.query_dtype, params.key_layout.dtype, tiles);
  const int64_t num_workers = at::get_num_threads();
  AttentionPlan plan = make_plan(params, num_workers);

  thread_local ReusableBuffer partials;
  if (plan.partitions_per_seq > 1) {
    const int64_t count = int64_t{params.num_seqs} * params.num_heads * plan.partitions_per_seq;
    plan.partial_accumulators = partials.floats(count * plan.padded_head_size);
    plan.partial_states = partials.states(count);
  }

  // One task per worker; each takes the next unclaimed item until none is left.
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min(num_workers, plan.num_items), /*grain_size=*/1,
                   [&](int64_t, int64_t) {
                     const Workspace workspace = thread_workspace(plan);
                     for (int64_t item = next_item++; item < plan.num_items; item = next_item++) {
                       kernel(params, plan, item, workspace);
                     }
                   });
  if (plan.partitions_per_seq > 1) combine_partitions(params, plan);
}

}  // namespace paged_attn::cpu
