// AMX (Advanced Matrix Extensions) inner loops of the bf16 paged_attention kernel: scores
// (q . k) and value sums (p * v), both straight from the cache rows, without repacking the
// cache. Part of the AVX-512 translation unit (attention_avx512.cpp includes this file under
// its target pragma, after its own helpers); never compiled on its own.
//
// One tile configuration serves a whole work item (configure_tiles):
//   tmm0  scores       16 tokens x G fp32          (C of the score product)
//   tmm1  cache rows   16 tokens x 32 bf16         (A of the scores: K; B of the values: V)
//   tmm2  queries      16 dim pairs x G bf16 pairs (B of the scores)
//   tmm3  weights      2G rows x 32 bf16           (A of the values)
//   tmm4-7 value sums  2G rows x 16 fp32           (C of the values, one per 32 columns)
// where G is the GQA group size. The value tiles exist only for G <= 8 (2G tile rows).
//
// Every loop is a template over `Tiles` (amx_tiles.h): the AMX instructions themselves, or the
// software model of the tile registers with which tests run these loops on CPUs without AMX.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/amx_tiles.h"
#include "cpu/attention.h"

namespace paged_attn::cpu {
namespace {

// Query heads per KV head up to which the value sums run on tiles (2 tile rows per head).
constexpr int32_t kMaxValueGroup = 8;

// One configuration for every tile a work item uses, in the table at the top of this file.
template <class Tiles>
void configure_tiles(int32_t group_size) {
  TileConfig config;
  config.rows[0] = config.rows[1] = config.rows[2] = 16;
  config.bytes_per_row[0] = static_cast<uint16_t>(4 * group_size);  // fp32 score per head
  config.bytes_per_row[1] = 64;                                      // 32 bf16 of a row
  config.bytes_per_row[2] = static_cast<uint16_t>(4 * group_size);   // bf16 pair per head
  if (group_size <= kMaxValueGroup) {
    for (int tile = 3; tile < 8; ++tile) {
      config.rows[tile] = static_cast<uint8_t>(2 * group_size);
      config.bytes_per_row[tile] = 64;
    }
  }
  Tiles::configure(config);
}

// bf16 scores on AMX: one TDPBF16PS multiplies a 16 x 32 tile of K (16 tokens, 32 dims, loaded
// straight from the cache with the token stride) by a 32 x G tile of the group's queries and
// adds into a 16 x G fp32 tile of scores, so 16 tokens x G heads cost head_size / 32 tile
// instructions instead of 16 * G AVX-512 dot products. The query tile must be in the "VNNI"
// layout: row r holds, for each head n, the pair (q_n[2r], q_n[2r + 1]); begin_item packs it
// once per item into workspace.packed, [item KV head][dim chunk][16 rows][G pairs].
template <class Tiles>
struct AmxScores {
  static bool applicable(const AttentionPlan& plan) {
    return plan.head_size % 32 == 0 && plan.group_size <= 16;
  }

  static void pack_queries(const BFloat16* query, int64_t head_stride, int32_t heads,
                           int32_t group_size, int32_t head_size, uint32_t* packed) {
    const int32_t chunks = head_size / 32;
    for (int32_t kv = 0; kv < heads; ++kv) {
      for (int32_t c = 0; c < chunks; ++c) {
        for (int32_t r = 0; r < 16; ++r) {
          for (int32_t n = 0; n < group_size; ++n) {
            const BFloat16* pair = query + (kv * group_size + n) * head_stride + 32 * c + 2 * r;
            uint32_t word;
            std::memcpy(&word, pair, sizeof(word));
            packed[((kv * chunks + c) * 16 + r) * group_size + n] = word;
          }
        }
      }
    }
  }

  // Scores of the whole groups of 16 tokens in [keys.begin, keys.end); returns where the
  // remainder (fewer than 16 tokens) starts.
  static int32_t score_groups(const QueryGroup<BFloat16>& queries, const BlockRows<BFloat16>& keys,
                              float score_scale, const AttentionPlan& plan,
                              const Workspace& workspace, PrefetchStream& stream) {
    const int32_t group_size = queries.group_size;
    const int32_t chunks = plan.head_size / 32;
    const uint32_t* packed = reinterpret_cast<const uint32_t*>(workspace.packed) +
                             int64_t{queries.index} * chunks * 16 * group_size;
    const int64_t row_bytes = keys.token_stride * static_cast<int64_t>(sizeof(BFloat16));
    const NextRows next = next_rows(keys);
    const __m512 scale = _mm512_set1_ps(score_scale);
    // The score tile is stored as [16 tokens][group_size]: head g's 16 scores are elements
    // g, g + group_size, g + 2 * group_size, ... of the image.
    const __m512i token_offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(group_size));
    alignas(64) float tile[16 * 16];
    const StepShare share(16, chunks);
    int32_t t = keys.begin;
    for (; t + 16 <= keys.end; t += 16) {
      Tiles::template zero<0>();
      for (int32_t c = 0; c < chunks; ++c) {
        Tiles::template load<1>(keys.rows + t * keys.token_stride + 32 * c, row_bytes);
        Tiles::template load<2>(packed + c * 16 * group_size, 4 * group_size);
        Tiles::template dot_bf16<0, 1, 2>();
        stream.step(share[c]);
      }
      Tiles::template store<0>(tile, 4 * group_size);
      for (int32_t token = t; token < t + 16; ++token) next.prefetch(token);
      for (int32_t g = 0; g < group_size; ++g) {
        const __m512 scores = _mm512_i32gather_ps(token_offsets, tile + g, 4);
        _mm512_storeu_ps(workspace.scores + g * plan.padded_block_size + t, _mm512_mul_ps(scores, scale));
      }
    }
    return t;
  }
};


// bf16 value sums on AMX, reading V rows as they lie in the cache. TDPBF16PS contracts over
// the rows of its B tile: loaded from 16 V rows (32 columns each), B row k holds token k's
// pairs (v_k[2n], v_k[2n+1]) for n < 16, and C[m][n] += sum_k A[m][2k] * v_k[2n] +
// A[m][2k+1] * v_k[2n+1]. With weight rows A[2g] = (p_g[k], 0) and A[2g+1] = (0, p_g[k]) for
// each k, row 2g of C collects head g's sums of the even columns and row 2g+1 those of the odd
// ones. Half of the products are by zero, but V never needs repacking, and 16 tokens x 32
// columns x G heads cost one tile instruction. A partial group of fewer than 16 tokens is
// copied, zero-padded, into a scratch first: the rows after the last attended token may be
// NaN, and 0 * NaN would poison the sums.
template <class Tiles>
struct AmxValues {
  static bool applicable(const AttentionPlan& plan) {
    return plan.head_size % 32 == 0 && plan.group_size <= kMaxValueGroup;
  }

  // accumulators[g] += sum_t p[g][t] * v_t over the attended tokens of one block; weights p:
  // [group_size, padded_block_size] fp32 (workspace.scores); accumulators: [group_size,
  // padded_head_size]. Columns go in passes of 4 x 32 (the four value-sum tiles).
  static void accumulate(const BlockRows<BFloat16>& values, int32_t group_size,
                         float* accumulators, const AttentionPlan& plan, const Workspace& workspace,
                         PrefetchStream& stream) {
    constexpr int32_t kTilesPerPass = 4;
    const int32_t chunks = plan.head_size / 32;
    const NextRows next = next_rows(values);
    for (int32_t pass = 0; pass < chunks; pass += kTilesPerPass) {
      const int32_t pass_chunks = std::min(kTilesPerPass, chunks - pass);
      Tiles::template zero<4>();
      Tiles::template zero<5>();
      Tiles::template zero<6>();
      Tiles::template zero<7>();
      for (int32_t t = values.begin; t < values.end; t += 16) {
        const int32_t tokens = std::min<int32_t>(16, values.end - t);
        if (pass == 0) {
          for (int32_t token = t; token < t + tokens; ++token) next.prefetch(token);
        }
        const StepShare share(tokens, chunks);
        load_weights(workspace.scores + t, plan.padded_block_size, group_size, tokens);
        const BFloat16* rows = values.rows + t * values.token_stride + 32 * pass;
        int64_t row_bytes = values.token_stride * static_cast<int64_t>(sizeof(BFloat16));
        alignas(64) BFloat16 padded[16 * 32 * kTilesPerPass];
        if (tokens < 16) {
          pad_rows(rows, values.token_stride, tokens, pass_chunks, padded);
          rows = padded;
          row_bytes = 64 * kTilesPerPass;
        }
        // Value-sum tile 4 + c takes columns 32c.. of the pass, then one prefetch step per
        // token of the group is spread over the pass's tile products.
        const auto product = [&](auto sum_tile) {
          constexpr int kSumTile = decltype(sum_tile)::value;
          constexpr int kChunk = kSumTile - 4;
          if (kChunk >= pass_chunks) return;
          Tiles::template load<1>(rows + 32 * kChunk, row_bytes);
          Tiles::template dot_bf16<kSumTile, 3, 1>();
          stream.step(share[pass + kChunk]);
        };
        product(std::integral_constant<int, 4>{});
        product(std::integral_constant<int, 5>{});
        product(std::integral_constant<int, 6>{});
        product(std::integral_constant<int, 7>{});
      }
      add_sums(accumulators + 32 * pass, group_size, pass_chunks, plan);
    }
  }

 private:
  // Tile 3 <- the weight rows of 16 tokens (fewer: zeros after `tokens`).
  static void load_weights(const float* weights, int64_t weight_stride, int32_t group_size,
                           int32_t tokens) {
    alignas(64) uint32_t rows[2 * kMaxValueGroup][16];
    for (int32_t g = 0; g < group_size; ++g) {
      const __m512 p = _mm512_maskz_loadu_ps(first_lanes16(tokens), weights + g * weight_stride);
      const __m512i low = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
      _mm512_store_si512(rows[2 * g], low);                            // (p, 0) pairs
      _mm512_store_si512(rows[2 * g + 1], _mm512_slli_epi32(low, 16));  // (0, p) pairs
    }
    Tiles::template load<3>(rows, 64);
  }

  // Copies `tokens` rows of 32 * chunks columns into [16][32 * kTilesPerPass], zeros after.
  static void pad_rows(const BFloat16* rows, int64_t token_stride, int32_t tokens, int32_t chunks,
                       BFloat16* padded) {
    for (int32_t row = 0; row < 16; ++row) {
      for (int32_t c = 0; c < chunks; ++c) {
        const __m512i data = row < tokens ? _mm512_loadu_si512(rows + row * token_stride + 32 * c)
                                          : _mm512_setzero_si512();
        _mm512_store_si512(padded + row * 128 + 32 * c, data);
      }
    }
  }

  // accumulators[g][32c + 2n (+1)] += row 2g (2g + 1) of value-sum tile 4 + c, column n.
  static void add_sums(float* accumulators, int32_t group_size, int32_t chunks,
                       const AttentionPlan& plan) {
    alignas(64) float sums[4][2 * kMaxValueGroup][16];
    Tiles::template store<4>(sums[0], 64);
    if (chunks > 1) Tiles::template store<5>(sums[1], 64);
    if (chunks > 2) Tiles::template store<6>(sums[2], 64);
    if (chunks > 3) Tiles::template store<7>(sums[3], 64);
    const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int32_t c = 0; c < chunks; ++c) {
      for (int32_t g = 0; g < group_size; ++g) {
        float* accumulator = accumulators + g * plan.padded_head_size + 32 * c;
        const __m512 even = _mm512_load_ps(sums[c][2 * g]);
        const __m512 odd = _mm512_load_ps(sums[c][2 * g + 1]);
        _mm512_store_ps(accumulator, _mm512_add_ps(_mm512_load_ps(accumulator),
                                                   _mm512_permutex2var_ps(even, first_half, odd)));
        _mm512_store_ps(accumulator + 16, _mm512_add_ps(_mm512_load_ps(accumulator + 16),
                                                        _mm512_permutex2var_ps(even, second_half, odd)));
      }
    }
  }
};

}  // namespace
}  // namespace paged_attn::cpu
