// The algorithm of one paged_attention work item, written once over an instruction-set policy.
//
// `Isa` supplies the three inner loops that decide the speed: score_block (scale * q . k for
// a GQA group and one block of K rows), softmax_block (exp and sum of one row of scores) and
// accumulate_block (acc += p * v for a group and one block of V rows). Everything else, which
// runs once per block rather than once per element, lives here: block iteration with the
// sliding window, scale / soft-cap / ALiBi, the online-softmax merge, the output write.
//
// attention_portable.cpp and attention_avx512.cpp each include this file with their own policy;
// the AVX-512 one compiles it under a wider target. Hence the unnamed namespace: each
// translation unit keeps its own copy, which the linker can never mix up.
#pragma once

#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/params.h"
#include "core/softmax_state.h"
#include "cpu/attention.h"
#include "cpu/dtype_dispatch.h"

namespace paged_attn::cpu {
namespace {

// Applies soft-cap and ALiBi to one block's scaled scores, in place.
// scores: [group_size, padded_block_size]; only columns [begin, end) hold data.
template <typename KV>
void transform_scores(const PagedAttentionParams& params, const AttentionPlan& plan,
                      const AttendedRange& range, int64_t block_start, int32_t first_query_head,
                      const BlockRows<KV>& keys, float* scores) {
  const float cap = params.logits_soft_cap;
  for (int32_t g = 0; g < plan.group_size; ++g) {
    float* row = scores + g * plan.padded_block_size;
    if (cap > 0.0f) {
      for (int32_t t = keys.begin; t < keys.end; ++t) row[t] = cap * std::tanh(row[t] / cap);
    }
    if (params.alibi_slopes != nullptr) {
      // ALiBi adds slope * (position - last position): 0 for the newest token, negative before.
      const float slope = params.alibi_slopes[first_query_head + g];
      const int64_t last_position = range.seq_len - 1;
      for (int32_t t = keys.begin; t < keys.end; ++t) {
        row[t] += slope * static_cast<float>(block_start + t - last_position);
      }
    }
  }
}

template <class Isa, typename Q, typename KV>
void attend_work_item(const PagedAttentionParams& params, const AttentionPlan& plan,
                      int64_t item_index, const Workspace& workspace) {
  WorkItem item = plan.item(item_index);
  item.end_kv_head = std::min(item.end_kv_head, params.num_kv_heads);
  const int32_t group_size = plan.group_size;
  const int32_t head_size = params.head_size;
  const int64_t row_length = plan.padded_head_size;
  const int32_t first_query_head = item.first_kv_head * group_size;
  const int32_t item_heads = item.end_kv_head - item.first_kv_head;
  const int32_t num_query_heads = item_heads * group_size;
  const int64_t block_size = params.key_layout.block_size;

  const AttendedRange range(params.seq_lens[item.seq], params.sliding_window, block_size);
  const int64_t first_block = range.first_block + int64_t{item.partition} * plan.blocks_per_partition;
  const int64_t end_block = std::min(range.end_block, first_block + plan.blocks_per_partition);

  // The item's queries in fp32, its zeroed accumulators and empty softmax states.
  const Q* query = static_cast<const Q*>(params.query) + item.seq * params.query_seq_stride;
  for (int32_t h = 0; h < num_query_heads; ++h) {
    const Q* source = query + (first_query_head + h) * params.query_head_stride;
    float* converted = workspace.queries + h * row_length;
    for (int32_t d = 0; d < head_size; ++d) converted[d] = static_cast<float>(source[d]);
    std::fill(converted + head_size, converted + row_length, 0.0f);
    std::fill(workspace.accumulators + h * row_length,
              workspace.accumulators + (h + 1) * row_length, 0.0f);
    workspace.states[h] = SoftmaxState{};
  }

  Isa::template begin_item<Q, KV>(params, plan, item, workspace);

  // fp8 caches hold value / scale: the key scale folds into the score scale, the value scale
  // into the final output factor.
  const float score_scale = params.scale * (params.k_scale ? *params.k_scale : 1.0f);
  const float value_scale = params.v_scale ? *params.v_scale : 1.0f;
  const KV* key_cache = static_cast<const KV*>(params.key_cache);
  const KV* value_cache = static_cast<const KV*>(params.value_cache);
  const int32_t* block_table = params.block_tables + item.seq * params.block_table_stride;

  // The spans of the item's blocks in order; following(span) is the one after it.
  const int32_t tokens_per_span =
      span_tokens(int64_t{item_heads} * head_size * static_cast<int64_t>(sizeof(KV)));
  const auto span_in = [&](int64_t block, int32_t from) {
    if (block >= end_block) return Span{};
    Span span;
    span.block = block;
    span.physical = block_table[block];
    span.begin = std::max(from, range.first_row(block, block_size));
    span.end = std::min(range.end_row(block, block_size),
                        (span.begin / tokens_per_span + 1) * tokens_per_span);
    return span;
  };
  const auto following = [&](const Span& span) {
    return span.end < range.end_row(span.block, block_size) ? span_in(span.block, span.end)
                                                            : span_in(span.block + 1, 0);
  };

  // Prefetching the next span. When it is one contiguous range per cache (dense NHD, the item
  // has every head) and the cache is fp32 with GQA, Intel's hardware prefetchers alone stream
  // it best: fp32 moves the most bytes per operation, memory time dominates, and software
  // prefetches only competed with the hardware for the core's fill buffers (Sapphire Rapids,
  // 16 x 8192 tokens, 32/8 heads, timed alternately in one process: block 32 89 -> 67 ms
  // without them). On AMD Zen 4 the same case is faster with the stream (16 x 2048 tokens:
  // block 32 18.7 -> 16.4 ms, block 128 19.5 -> 17.6 ms), so the driver decides by vendor
  // (plan.fp32_gqa_hardware_prefetch). Narrower caches spend longer computing per byte, the
  // hardware streams fall behind meanwhile, and a prefetch stream spread over the compute
  // pays: bf16 with AMX, one step after each tile product, block 32 70 -> 57 ms and block 128
  // 51 -> 44 ms; fp16 block 32 62 -> 55 ms. At the other end, fp32 without GQA (one query head
  // per KV head) consumes rows faster than the hardware streams run ahead, and the stream pays
  // there too (16 x 4096 tokens, 8/8 heads: 46-56 -> 37-41 ms in three runs; 4 x 2048, 32/32
  // heads: faster in three runs of four). When the item's heads are a run within each token
  // row (NHD, some heads), the stream prefetches those runs (fp32, 4 x 2048 tokens, 32 KV
  // heads, 16 per item: 35 -> 28 ms with it), and when the item scores one KV head at a time
  // (see below), each head's turn prefetches one slice of them. Otherwise (HND) the kernels
  // prefetch the next span row by row.
  const bool dtype_prefers_hardware_prefetch =
      std::is_same_v<KV, float> && group_size > 1 && plan.fp32_gqa_hardware_prefetch;

  // When the item's heads lie side by side in every token row (NHD), one score_block call
  // scores all of them, a token tile at a time across the heads, so the span's K rows are read
  // in address order instead of once per head at a stride of a whole token row. Timed
  // alternately in one process on AMD Zen 5 against per-head scoring: 4 x 2048 tokens with
  // 32/32 heads, bf16 6.18 -> 4.77 ms and fp32 8.12 -> 6.81 ms; with 32/8 and 32/4 heads
  // within +-5% (16 x 2048 and 16 x 8192 tokens, blocks 16, 32 and 128). One prefetch stream
  // then covers the whole next span, spread over the work of every head.
  const bool scores_across_heads = Isa::template kScoresAcrossHeads<Q, KV> && item_heads > 1 &&
                                   params.key_layout.head_stride == head_size;
  const QueryGroup<Q> item_queries{query + first_query_head * params.query_head_stride,
                                   params.query_head_stride, workspace.queries, group_size, 0};

  for (Span span = span_in(first_block, 0); span.valid();) {
    const Span next = following(span);
    const int64_t block_start = span.block * block_size;
    const int32_t begin = span.begin;
    const int32_t end = span.end;

    const ByteRange next_keys = next_span_range(key_cache, params.key_layout, next,
                                                item.first_kv_head, item_heads);
    const ByteRange next_values = next_span_range(value_cache, params.value_layout, next,
                                                  item.first_kv_head, item_heads);
    const bool hardware_prefetch =
        dtype_prefers_hardware_prefetch && next_keys.runs == 1 && next_values.runs == 1;
    const int64_t prefetch_steps = Isa::template prefetch_steps<Q, KV>(group_size, end - begin, plan);
    // The rows of `kv_head` in this span of one cache, and the rows of the next span to
    // prefetch one by one when the next span is not a byte range (HND).
    const auto rows_of = [&](const KV* cache, const CacheLayout& layout,
                             const ByteRange& sequential, int32_t kv_head) {
      const bool row_prefetch = next.valid() && !sequential.first;
      return BlockRows<KV>{
          cache + layout.offset(span.physical, 0, kv_head),
          row_prefetch ? cache + layout.offset(next.physical, next.begin, kv_head) : nullptr,
          layout.token_stride, begin, end};
    };

    PrefetchStream span_stream;
    if (scores_across_heads) {
      if (!hardware_prefetch) span_stream = PrefetchStream(next_keys, next_values, item_heads * prefetch_steps);
      Isa::score_block(item_queries, rows_of(key_cache, params.key_layout, next_keys, item.first_kv_head),
                       item_heads, params.key_layout.head_stride, score_scale, plan, workspace,
                       span_stream);
    }

    for (int32_t kv_head = item.first_kv_head; kv_head < item.end_kv_head; ++kv_head) {
      const int32_t slice = kv_head - item.first_kv_head;
      const int32_t local_head = slice * group_size;
      PrefetchStream head_stream = hardware_prefetch || scores_across_heads
          ? PrefetchStream()
          : PrefetchStream(next_keys.slice(slice, item_heads), next_values.slice(slice, item_heads),
                           prefetch_steps);
      PrefetchStream& stream = scores_across_heads ? span_stream : head_stream;
      // The policies see this group's rows of the scores.
      Workspace group_workspace = workspace;
      group_workspace.scores = workspace.scores + int64_t{local_head} * plan.padded_block_size;
      const BlockRows<KV> keys = rows_of(key_cache, params.key_layout, next_keys, kv_head);
      const BlockRows<KV> values = rows_of(value_cache, params.value_layout, next_values, kv_head);
      float* accumulators = workspace.accumulators + local_head * row_length;

      if (!scores_across_heads) {
        const QueryGroup<Q> group{query + (first_query_head + local_head) * params.query_head_stride,
                                  params.query_head_stride, workspace.queries + local_head * row_length,
                                  group_size, slice};
        Isa::score_block(group, keys, 1, params.key_layout.head_stride, score_scale, plan,
                         group_workspace, stream);
      }
      if (params.logits_soft_cap > 0.0f || params.alibi_slopes != nullptr) {
        transform_scores(params, plan, range, block_start, first_query_head + local_head, keys,
                         group_workspace.scores);
      }
      // Online softmax: fold this block's scores into each head's running state, rescale the
      // accumulator onto the new maximum, and turn the scores into weights on that maximum.
      for (int32_t g = 0; g < group_size; ++g) {
        float* probabilities = group_workspace.scores + g * plan.padded_block_size;
        const SoftmaxState block_state = Isa::softmax_block(probabilities + begin, end - begin);
        const SoftmaxState::Rescale rescale = workspace.states[local_head + g].merge(block_state);
        if (rescale.self != 1.0f) {
          float* accumulator = accumulators + g * row_length;
          for (int64_t d = 0; d < row_length; ++d) accumulator[d] *= rescale.self;
        }
        if (rescale.other != 1.0f) {
          for (int32_t t = begin; t < end; ++t) probabilities[t] *= rescale.other;
        }
      }
      Isa::template accumulate_block<Q>(values, group_size, accumulators, plan, group_workspace, stream);
      head_stream.finish();
    }
    span_stream.finish();
    span = next;
  }

  // Finish: the output row itself when the sequence has one partition, else a partial result
  // for the combine step. The policy first puts its accumulators in natural column order.
  Isa::end_item();
  Isa::template finish_accumulators<Q, KV>(workspace.accumulators, num_query_heads, plan);
  for (int32_t h = 0; h < num_query_heads; ++h) {
    const float* accumulator = workspace.accumulators + h * row_length;
    const SoftmaxState& state = workspace.states[h];
    const int32_t head = first_query_head + h;
    if (plan.partitions_per_seq == 1) {
      Q* out = static_cast<Q*>(params.out) + item.seq * params.out_seq_stride +
               head * params.out_head_stride;
      store_row(out, accumulator, head_size, state.inverse_sum() * value_scale);
    } else {
      const int64_t index = plan.partial_index(item.seq, head, params.num_heads, item.partition);
      plan.partial_states[index] = state;
      std::memcpy(plan.partial_accumulators + index * row_length, accumulator,
                  sizeof(float) * row_length);
    }
  }
}

// The item kernel of `Isa` for a (query, cache) dtype pair.
template <class Isa>
ItemKernel select_item_kernel(ScalarKind query, ScalarKind cache) {
  return with_value_and_cache_types<CpuElementTypes>(query, cache, [](auto query_tag, auto cache_tag) {
    using Q = typename decltype(query_tag)::type;
    using KV = typename decltype(cache_tag)::type;
    return static_cast<ItemKernel>(&attend_work_item<Isa, Q, KV>);
  });
}

}  // namespace
}  // namespace paged_attn::cpu
