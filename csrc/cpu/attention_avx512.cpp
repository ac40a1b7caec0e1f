// The AVX-512 work-item kernel of paged_attention (F/BW/VL/BF16: Sapphire Rapids, Zen 4 and 5):
// the instruction-set policy Avx512Isa that attention_item.h's algorithm runs with, and its
// selection by dtype pair and AMX mode.
//
// Only this translation unit is compiled for AVX-512 (and AMX), through a target pragma;
// isa.cpp decides at run time whether it may be called, and whether its AMX path runs on the
// hardware's tiles or on the software model of them (amx_tiles.h). Every standard and shared
// header is included *before* the pragma so that the inline functions they define stay
// baseline code. The files that hold AVX-512 code are included after it and keep internal
// linkage, so only this file's copy ever runs with AVX-512: the algorithm (attention_item.h),
// the vector helpers (avx512_vectors.h), the register tiles (attention_avx512_tiles.h) and the
// AMX inner loops (attention_amx.h).
//
// Vector arithmetic: a __m512 holds 16 fp32 lanes, so a head_size row is processed in chunks
// of 16 elements, the last chunk masked (any head_size works; lanes past head_size are never
// read, since a padded cache may hold NaN there). 16-bit rows are loaded 16 elements (32
// bytes) at a time and widened to fp32 in registers; bf16 x bf16 dot products instead use
// vdpbf16ps on 32-element chunks, which multiplies pairs of bf16 exactly and adds in fp32.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "core/params.h"
#include "core/softmax_state.h"
#include "cpu/attention.h"
#include "cpu/dtype_dispatch.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")
// GCC 12 flags its own _mm512_cvtph_ps and _mm512_shuffle_f32x4 (avx512fintrin.h), which pass
// an undefined vector as the unused merge source, as (maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/attention_item.h"
#include "cpu/avx512_vectors.h"
#include "cpu/attention_avx512_tiles.h"
#include "cpu/attention_amx.h"

namespace paged_attn::cpu {
namespace {

// NoTiles: AVX-512 only. Otherwise the bf16 x bf16 items run their scores and value sums on
// AMX tiles through `Tiles` (HardwareTiles or EmulatedTiles, amx_tiles.h).
struct NoTiles {};

template <class Tiles>
struct Avx512Isa {
  static constexpr bool kAmx = !std::is_same_v<Tiles, NoTiles>;
  using Scores = AmxScores<Tiles>;
  using Values = AmxValues<Tiles>;

  // scores[k * group_size + g][t] = score_scale * q_g . k_t of KV head k < kv_heads for the
  // attended tokens t of one span, head k's rows starting k * head_stride elements after
  // `keys.rows`. bf16 x bf16 uses vdpbf16ps on the cache rows (or, for one KV head, the AMX
  // tiles); fp32 uses the cache rows as they are; other caches (fp16, fp8) are first widened
  // into workspace.block, once for all query heads of the group (one KV head per call).
  template <typename Q, typename KV>
  static void score_block(const QueryGroup<Q>& queries, const BlockRows<KV>& keys,
                          int32_t kv_heads, int64_t head_stride, float score_scale,
                          const AttentionPlan& plan, const Workspace& workspace,
                          PrefetchStream& stream) {
    const NextRows next = next_rows(keys);
    const int32_t group_size = queries.group_size;
    if constexpr (std::is_same_v<Q, BFloat16> && std::is_same_v<KV, BFloat16>) {
      int32_t rest = keys.begin;
      if constexpr (kAmx) {
        if (Scores::applicable(plan) && kv_heads == 1) {
          rest = Scores::score_groups(queries, keys, score_scale, plan, workspace, stream);
        }
      }
      ScoreRows<Bf16Dot>::run(Bf16Dot{queries.raw, queries.raw_head_stride}, keys.rows,
                              head_stride, kv_heads, keys.token_stride, rest, keys.end,
                              group_size, score_scale, next, stream, plan, workspace.scores);
    } else if constexpr (std::is_same_v<KV, float>) {
      ScoreRows<Fp32Dot>::run(Fp32Dot{queries.converted, plan.padded_head_size}, keys.rows,
                              head_stride, kv_heads, keys.token_stride, keys.begin, keys.end,
                              group_size, score_scale, next, stream, plan, workspace.scores);
    } else {
      // One KV head: kScoresAcrossHeads is false for the widened caches.
      for (int32_t t = keys.begin; t < keys.end; ++t) {
        next.prefetch(t);
        stream.step();
        const KV* key = keys.rows + t * keys.token_stride;
        float* widened = workspace.block + t * plan.padded_head_size;
        for (int64_t d = 0; d < plan.head_size; d += 16) {
          _mm512_store_ps(widened + d, load_floats(key + d, first_lanes16(plan.head_size - d)));
        }
      }
      ScoreRows<Fp32Dot>::run(Fp32Dot{queries.converted, plan.padded_head_size}, workspace.block,
                              0, 1, plan.padded_head_size, keys.begin, keys.end, group_size,
                              score_scale, NextRows{}, stream, plan, workspace.scores);
    }
  }

  // Replaces scores[0..count) by exp(score - max) and returns their (max, sum).
  static SoftmaxState softmax_block(float* scores, int32_t count) {
    const __m512 minus_infinity = _mm512_set1_ps(-INFINITY);
    __m512 maxima = minus_infinity;
    for (int32_t i = 0; i < count; i += 16) {
      maxima = _mm512_max_ps(maxima, _mm512_mask_loadu_ps(minus_infinity, first_lanes16(count - i), scores + i));
    }
    SoftmaxState state;
    state.max = _mm512_reduce_max_ps(maxima);
    const __m512 max = _mm512_set1_ps(state.max);
    __m512 sums = _mm512_setzero_ps();
    for (int32_t i = 0; i < count; i += 16) {
      const __mmask16 lanes = first_lanes16(count - i);
      const __m512 weights = exp_floats(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + i), max));
      _mm512_mask_storeu_ps(scores + i, lanes, weights);
      sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(lanes, weights));
    }
    state.sum = _mm512_reduce_add_ps(sums);
    return state;
  }

  // Whether an item runs on AMX tiles (configured in begin_item): bf16 queries and cache.
  template <typename Q, typename KV>
  static constexpr bool kTiles = kAmx && std::is_same_v<Q, BFloat16> && std::is_same_v<KV, BFloat16>;
  // Whether an item should score all its KV heads in one score_block call when their rows
  // share each token row: for the pairs that score straight from the cache rows, unless the
  // AMX tiles serve them (one KV head at a time). The widened caches (fp16, fp8) stay one
  // head per call: widening reads one head's rows at a time anyway, so the order gains
  // nothing there.
  template <typename Q, typename KV>
  static constexpr bool kScoresAcrossHeads =
      !kTiles<Q, KV> && (std::is_same_v<KV, float> || (std::is_same_v<Q, BFloat16> && std::is_same_v<KV, BFloat16>));
  template <typename Q, typename KV>
  static bool amx_values(const AttentionPlan& plan) {
    return kTiles<Q, KV> && Scores::applicable(plan) && Values::applicable(plan);
  }

  // accumulators[g] += sum_t p[g][t] * v_t over the attended tokens of one block, with the
  // weights p in workspace.scores; accumulators: [group_size, padded_head_size]. With AMX
  // tiles, AmxValues; otherwise heads go in register tiles of up to kMaxHeads, the first of
  // which prefetches the next block: Bf16PairTile on bf16 weights (written to
  // workspace.block) for bf16 caches, AccumulateTile for the others.
  template <typename Q, typename KV>
  static void accumulate_block(const BlockRows<KV>& values, int32_t group_size,
                               float* accumulators, const AttentionPlan& plan,
                               const Workspace& workspace, PrefetchStream& stream) {
    if constexpr (kTiles<Q, KV>) {
      if (amx_values<Q, KV>(plan)) {
        Values::accumulate(values, group_size, accumulators, plan, workspace, stream);
        return;
      }
    }
    if constexpr (std::is_same_v<KV, BFloat16>) {
      BFloat16* weights = reinterpret_cast<BFloat16*>(workspace.block);
      for (int32_t g = 0; g < group_size; ++g) {
        const float* row = workspace.scores + g * plan.padded_block_size;
        for (int32_t t = 0; t < values.end; t += 16) {
          const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(row + t));
          std::memcpy(weights + g * plan.padded_block_size + t, &rounded, sizeof(rounded));
        }
      }
      for (int32_t g = 0; g < group_size; g += Bf16PairTile::kMaxHeads) {
        const int32_t tile_heads = std::min<int32_t>(group_size - g, Bf16PairTile::kMaxHeads);
        const int columns = 32 * Bf16PairTile::chunks_for(tile_heads);
        Bf16PairTile::Table::pick(tile_heads, plan.head_size % columns == 0)(
            values, weights + g * plan.padded_block_size, accumulators + g * plan.padded_head_size,
            g == 0 ? next_rows(values) : NextRows{}, g == 0 ? &stream : nullptr, plan);
      }
    } else {
      constexpr int kMaxHeads = AccumulateTile<KV>::kMaxHeads;
      for (int32_t g = 0; g < group_size; g += kMaxHeads) {
        const int32_t tile_heads = std::min<int32_t>(group_size - g, kMaxHeads);
        const int columns = 16 * AccumulateTile<KV>::vectors_for(tile_heads);
        AccumulateTile<KV>::Table::pick(tile_heads, plan.head_size % columns == 0)(
            values, workspace.scores + g * plan.padded_block_size,
            accumulators + g * plan.padded_head_size, g == 0 ? next_rows(values) : NextRows{},
            g == 0 ? &stream : nullptr, plan);
      }
    }
  }

  // With AMX, each item configures the tiles and packs its queries; the tiles are released
  // at the end, so no tile state outlives the item.
  template <typename Q, typename KV>
  static void begin_item(const PagedAttentionParams& params, const AttentionPlan& plan,
                         const WorkItem& item, const Workspace& workspace) {
    if constexpr (kTiles<Q, KV>) {
      if (!Scores::applicable(plan)) return;
      configure_tiles<Tiles>(plan.group_size);
      const BFloat16* query = static_cast<const BFloat16*>(params.query) +
                              item.seq * params.query_seq_stride +
                              int64_t{item.first_kv_head} * plan.group_size * params.query_head_stride;
      Scores::pack_queries(query, params.query_head_stride,
                              std::min(item.end_kv_head, params.num_kv_heads) - item.first_kv_head,
                              plan.group_size, plan.head_size,
                              reinterpret_cast<uint32_t*>(workspace.packed));
    }
  }
  static void end_item() {
    if constexpr (kAmx) Tiles::release();
  }

  // Prefetch steps the kernels take per head and block: one per (query head, token) while
  // scoring on AVX-512, one per token with AMX scores, one per token while accumulating.
  template <typename Q, typename KV>
  static int64_t prefetch_steps(int32_t group_size, int32_t tokens, const AttentionPlan& plan) {
    const bool amx_scores = kTiles<Q, KV> && Scores::applicable(plan);
    return int64_t{amx_scores ? 2 : group_size + 1} * tokens;
  }

  // Natural column order for the output: only the bf16 pair accumulation permutes columns.
  template <typename Q, typename KV>
  static void finish_accumulators(float* accumulators, int32_t rows, const AttentionPlan& plan) {
    if constexpr (std::is_same_v<KV, BFloat16>) {
      if (!amx_values<Q, KV>(plan)) Bf16PairTile::restore_column_order(accumulators, rows, plan);
    }
  }
};

}  // namespace

ItemKernel avx512_item_kernel(ScalarKind query, ScalarKind cache, AmxMode tiles) {
  // Tiles serve only bf16 queries on a bf16 cache; every other pair runs the same code either
  // way, so only that pair is compiled once per tile implementation.
  if (tiles == AmxMode::kNone || query != ScalarKind::kBFloat16 || cache != ScalarKind::kBFloat16) {
    return select_item_kernel<Avx512Isa<NoTiles>>(query, cache);
  }
  return tiles == AmxMode::kHardware ? &attend_work_item<Avx512Isa<HardwareTiles>, BFloat16, BFloat16>
                                      : &attend_work_item<Avx512Isa<EmulatedTiles>, BFloat16, BFloat16>;
}

}  // namespace paged_attn::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options
