// The portable work-item kernel of paged_attention: plain C++ inner loops, compiled for the
// baseline instruction set, used on CPUs without AVX-512 and forced in tests with
// PAGED_ATTN_CPU_ISA=portable (see isa.h). It computes exactly what the AVX-512 kernel
// computes, in the same order of blocks, so both are checked against one reference.
#include <cmath>

#include "cpu/attention.h"
#include "cpu/attention_item.h"

namespace paged_attn::cpu {
namespace {

// Partial sums kept side by side, so the compiler can vectorize a dot product without being
// allowed to reassociate floating-point additions.
constexpr int kLanes = 8;

struct PortableIsa {
  // Converts the first head_size elements of a K/V row to fp32 in `row`; the padding up to
  // row_length stays zero, so dot products may run over whole padded rows.
  template <typename KV>
  static void convert_row(const KV* source, int32_t head_size, int64_t row_length, float* row) {
    for (int32_t d = 0; d < head_size; ++d) row[d] = static_cast<float>(source[d]);
    for (int64_t d = head_size; d < row_length; ++d) row[d] = 0.0f;
  }

  // scores[k * group_size + g][t] = score_scale * q_g . k_t of KV head k < kv_heads for the
  // attended tokens t of one span, head k's rows starting k * head_stride elements after
  // `keys.rows`; token by token across the heads, so rows that share a token row are read in
  // address order.
  template <typename Q, typename KV>
  static void score_block(const QueryGroup<Q>& queries, const BlockRows<KV>& keys,
                          int32_t kv_heads, int64_t head_stride, float score_scale,
                          const AttentionPlan& plan, const Workspace& workspace,
                          PrefetchStream& stream) {
    const int64_t row_length = plan.padded_head_size;
    float* row = workspace.block;
    const NextRows next = next_rows(keys);
    for (int32_t t = keys.begin; t < keys.end; ++t) {
      next.prefetch(t);
      for (int32_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
        convert_row(keys.rows + kv_head * head_stride + t * keys.token_stride, plan.head_size,
                    row_length, row);
        for (int32_t g = 0; g < queries.group_size; ++g) {
          stream.step();
          const int64_t query_head = int64_t{kv_head} * queries.group_size + g;
          const float* query = queries.converted + query_head * row_length;
          float lanes[kLanes] = {};
          for (int64_t d = 0; d < row_length; d += kLanes) {
            for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += query[d + lane] * row[d + lane];
          }
          float dot = 0.0f;
          for (float lane : lanes) dot += lane;
          workspace.scores[query_head * plan.padded_block_size + t] = dot * score_scale;
        }
      }
    }
  }
  // Every pair scores several heads at once as well as one.
  template <typename Q, typename KV>
  static constexpr bool kScoresAcrossHeads = true;

  // Replaces scores[0..count) by exp(score - max) and returns their (max, sum).
  static SoftmaxState softmax_block(float* scores, int32_t count) {
    SoftmaxState state;
    for (int32_t i = 0; i < count; ++i) state.max = std::fmax(state.max, scores[i]);
    for (int32_t i = 0; i < count; ++i) {
      scores[i] = std::exp(scores[i] - state.max);
      state.sum += scores[i];
    }
    return state;
  }

  // No per-item state; prefetch steps: one per (query head, token) while scoring, one per token
  // while accumulating.
  template <typename Q, typename KV>
  static void begin_item(const PagedAttentionParams&, const AttentionPlan&, const WorkItem&,
                         const Workspace&) {}
  static void end_item() {}
  template <typename Q, typename KV>
  static int64_t prefetch_steps(int32_t group_size, int32_t tokens, const AttentionPlan&) {
    return int64_t{group_size + 1} * tokens;
  }

  // The accumulators are in natural column order already.
  template <typename Q, typename KV>
  static void finish_accumulators(float*, int32_t, const AttentionPlan&) {}

  // accumulators[g] += sum_t p[g][t] * v_t over the attended tokens of one block, with the
  // weights p in workspace.scores. accumulators: [group_size, padded_head_size].
  template <typename Q, typename KV>
  static void accumulate_block(const BlockRows<KV>& values, int32_t group_size,
                               float* accumulators, const AttentionPlan& plan,
                               const Workspace& workspace, PrefetchStream& stream) {
    const int64_t row_length = plan.padded_head_size;
    float* row = workspace.block;
    const NextRows next = next_rows(values);
    for (int32_t t = values.begin; t < values.end; ++t) {
      next.prefetch(t);
      stream.step();
      convert_row(values.rows + t * values.token_stride, plan.head_size, row_length, row);
      for (int32_t g = 0; g < group_size; ++g) {
        const float weight = workspace.scores[g * plan.padded_block_size + t];
        float* accumulator = accumulators + g * row_length;
        for (int64_t d = 0; d < row_length; ++d) accumulator[d] += weight * row[d];
      }
    }
  }
};

}  // namespace

ItemKernel portable_item_kernel(ScalarKind query, ScalarKind cache) {
  return select_item_kernel<PortableIsa>(query, cache);
}

}  // namespace paged_attn::cpu
