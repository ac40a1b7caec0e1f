// The AVX-512 register tiles of the CPU paged_attention kernel: dot-product policies (fp32,
// bf16 via vdpbf16ps), the score tiles (ScoreRows) and the value-accumulation tiles
// (AccumulateTile, Bf16PairTile) that Avx512Isa in attention_avx512.cpp calls per span.
// Part of the AVX-512 translation unit, like avx512_vectors.h: included under its target
// pragma after every standard header it needs; never compiled on its own.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/attention.h"
#include "cpu/avx512_vectors.h"
#include "cpu/dtype_dispatch.h"

namespace paged_attn::cpu {
namespace {

// Dot products of query rows with key rows, one step (chunk of the head dimension) at a time,
// so that a caller can advance 16 independent dot products together and keep them all in
// registers. fma() leaves 16 partial sums per dot product in a vector.
// Fp32Dot: fp32 query (zero-padded, aligned) against fp32 key rows, 16 elements per step.
struct Fp32Dot {
  using Key = float;
  using Mask = __mmask16;
  using Chunk = __m512;
  static constexpr int kStep = 16;
  const float* queries;  // [group_size, row_length]
  int64_t row_length;

  static Mask mask(int64_t remaining) { return first_lanes16(remaining); }
  Chunk query(int32_t g, int64_t d, Mask) const { return _mm512_load_ps(queries + g * row_length + d); }
  static Chunk key(const float* key, Mask lanes) { return _mm512_maskz_loadu_ps(lanes, key); }
  static __m512 fma(__m512 sum, Chunk query, Chunk key) { return _mm512_fmadd_ps(query, key, sum); }
};

// Bf16Dot: bf16 query rows straight from the query tensor against bf16 key rows, 32 elements
// per step: vdpbf16ps multiplies neighbouring pairs exactly and adds both products into the
// 16 fp32 lanes.
struct Bf16Dot {
  using Key = BFloat16;
  using Mask = __mmask32;
  using Chunk = __m512bh;
  static constexpr int kStep = 32;
  const BFloat16* queries;  // [group_size, head_size], rows query_stride apart
  int64_t query_stride;

  static Mask mask(int64_t remaining) { return first_lanes32(remaining); }
  Chunk query(int32_t g, int64_t d, Mask lanes) const {
    return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(lanes, queries + g * query_stride + d));
  }
  static Chunk key(const BFloat16* key, Mask lanes) {
    return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(lanes, key));
  }
  static __m512 fma(__m512 sum, Chunk query, Chunk key) { return _mm512_dpbf16_ps(sum, query, key); }
};

// A kernel table indexed by a run-time count: kernels[n - 1] is Kernel<n>, for n up to kCount,
// each with kFull = whether the head dimension splits into whole chunks (every mask all ones,
// known at compile time, so masked loads compile to plain ones).
template <template <int, bool> class Kernel, int kCount>
struct KernelTable {
  template <bool kFull, int... kMinusOne>
  static constexpr auto make(std::integer_sequence<int, kMinusOne...>) {
    return std::array{&Kernel<kMinusOne + 1, kFull>::run...};
  }
  static constexpr auto full = make<true>(std::make_integer_sequence<int, kCount>{});
  static constexpr auto partial = make<false>(std::make_integer_sequence<int, kCount>{});
  static auto pick(int count, bool whole_chunks) {
    return (whole_chunks ? full : partial)[count - 1];
  }
};

// Lanes of the chunk of a head row starting at `start`; all ones (a compile-time constant)
// when the caller knows every chunk is whole.
template <bool kFull, class Dot>
inline typename Dot::Mask chunk_mask(int64_t head_size, int64_t start) {
  return kFull ? typename Dot::Mask(~typename Dot::Mask(0)) : Dot::mask(head_size - start);
}

// The dot products of every query of a group with key rows [begin, end), in register tiles
// of kHeads query heads x kTokens = 16 / kHeads tokens: each step loads kTokens key chunks
// and kHeads query chunks and makes 16 fused products, so each key line is read once per tile
// of heads, not once per head. (Reading it once per head cost about twice the time on Zen 4:
// fp32 NHD rows of 8 heads lie 4 KiB apart, so the 16 rows of a group fall into one 8-way L1
// set and every head's pass refetched them from L2.) bf16 takes the same tiles: on Zen 5 they
// beat one-head tiles warm and cold (one thread, 512 tokens, 8/2 heads: 22.8 -> 20 us a call;
// 16 x 2048 tokens, 32/8 heads: 5.1-5.9 -> 4.8-5.4 ms in three runs), where on Zen 4 they had
// measured 6-12% slower cold. sum_each_of_16 then reduces the tile's
// 16 dot products together; lane h * kTokens + t holds head h, token t. A group splits into
// tiles of 16, 8, 4, 2 and 1 heads. A last partial tile reads its missing rows as copies of
// the last attended row (never the slots after it, which may hold NaN) and stores nothing
// for them. scores: [group, block].
template <class Dot>
struct ScoreRows {
  template <int kHeads, bool kFull>
  struct Tile {
    static constexpr int kTokens = 16 / kHeads;

    static void run(const Dot& dot, int32_t first_head, const typename Dot::Key* rows,
                    int64_t row_stride, int32_t begin, int32_t end, float score_scale,
                    const NextRows* next, PrefetchStream& stream, const AttentionPlan& plan,
                    float* scores) {
      const int32_t head_size = plan.head_size;
      const int32_t steps = (head_size + Dot::kStep - 1) / Dot::kStep;
      const __m512 scale = _mm512_set1_ps(score_scale);
      const StepShare full_tile_share(kHeads * kTokens, steps);
      for (int32_t t = begin; t < end; t += kTokens) {
        const int32_t tokens = std::min<int32_t>(kTokens, end - t);
        const StepShare share = tokens == kTokens ? full_tile_share : StepShare(kHeads * tokens, steps);
        if (next) {
          for (int32_t token = t; token < t + tokens; ++token) next->prefetch(token);
        }
        const typename Dot::Key* key[kTokens];
        for (int i = 0; i < kTokens; ++i) key[i] = rows + std::min(t + i, end - 1) * row_stride;
        __m512 sums[16];
        for (int lane = 0; lane < 16; ++lane) sums[lane] = _mm512_setzero_ps();
        for (int32_t step = 0; step < steps; ++step) {
          const int64_t d = int64_t{step} * Dot::kStep;
          const typename Dot::Mask lanes = chunk_mask<kFull, Dot>(head_size, d);
          if constexpr (kHeads == 1) {
            // Each key chunk feeds one product: loaded where it is used, so that 16 keys and
            // 16 sums need not be live at once (33 vectors would spill).
            const typename Dot::Chunk query = dot.query(first_head, d, lanes);
            for (int i = 0; i < kTokens; ++i) sums[i] = Dot::fma(sums[i], query, Dot::key(key[i] + d, lanes));
          } else {
            typename Dot::Chunk keys[kTokens];
            for (int i = 0; i < kTokens; ++i) keys[i] = Dot::key(key[i] + d, lanes);
            for (int h = 0; h < kHeads; ++h) {
              const typename Dot::Chunk query = dot.query(first_head + h, d, lanes);
              for (int i = 0; i < kTokens; ++i) {
                sums[h * kTokens + i] = Dot::fma(sums[h * kTokens + i], query, keys[i]);
              }
            }
          }
          stream.step(share[step]);
        }
        __m512 halves[8];
        for (int pair = 0; pair < 8; ++pair) {
          halves[pair] = add_halves(sums[lane_of_slot(2 * pair)], sums[lane_of_slot(2 * pair + 1)]);
        }
        const __m512 tile = _mm512_mul_ps(sum_each_of_16(halves), scale);
        // Head h's lanes [h * kTokens, h * kTokens + tokens) go to its row at column t.
        for (int h = 0; h < kHeads; ++h) {
          const __mmask16 head_lanes = static_cast<__mmask16>(((1u << tokens) - 1) << (h * kTokens));
          _mm512_mask_storeu_ps(scores + (first_head + h) * plan.padded_block_size + t - h * kTokens,
                                head_lanes, tile);
        }
      }
    }
  };

  // A tile makes 16 dot products, one sum_each_of_16: at most 16 heads.
  static constexpr int kMaxTileHeads = 16;
  // Tiles of 1, 2, 4, ... up to kMaxTileHeads heads; index i holds 2^i heads (and 16 >> i
  // tokens). Only those tiles are instantiated.
  static constexpr int kTileSizes = std::bit_width(static_cast<unsigned>(kMaxTileHeads));
  template <bool kFull, size_t... kIndex>
  static constexpr auto tiles(std::index_sequence<kIndex...>) {
    return std::array{&Tile<(1 << kIndex), kFull>::run...};
  }
  static constexpr auto kFullTiles = tiles<true>(std::make_index_sequence<kTileSizes>{});
  static constexpr auto kPartialTiles = tiles<false>(std::make_index_sequence<kTileSizes>{});
  // The largest tile for `heads` remaining heads.
  static int tile_index(int32_t heads) {
    return std::bit_width(static_cast<unsigned>(std::min<int32_t>(heads, kMaxTileHeads))) - 1;
  }

  // The scores of every query head of `kv_heads` KV heads whose rows share each token row
  // (head k's row starts k * head_stride elements after head 0's), one token tile at a time
  // across all heads, so that several heads' K rows are read in address order. A group splits
  // into tiles of 16, 8, 4, 2 and 1 heads; the token tile is the largest tile's.
  static void run(const Dot& dot, const typename Dot::Key* rows, int64_t head_stride,
                  int32_t kv_heads, int64_t row_stride, int32_t begin, int32_t end,
                  int32_t group_size, float score_scale, const NextRows& next,
                  PrefetchStream& stream, const AttentionPlan& plan, float* scores) {
    const auto& kernels = plan.head_size % Dot::kStep == 0 ? kFullTiles : kPartialTiles;
    const int32_t token_step = 16 >> tile_index(group_size);
    for (int32_t t = begin; t < end; t += token_step) {
      const int32_t tile_end = std::min(end, t + token_step);
      for (int32_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
        for (int32_t head = 0; head < group_size;) {
          const int index = tile_index(group_size - head);
          const bool first = kv_head == 0 && head == 0;
          kernels[index](dot, kv_head * group_size + head, rows + kv_head * head_stride, row_stride,
                         t, tile_end, score_scale, first ? &next : nullptr, stream, plan, scores);
          head += 1 << index;
        }
      }
    }
  }
};

// Register tile of the value accumulation: kHeads query heads x kVectors * 16 output columns
// of accumulators stay in registers while the block's V rows stream past; each V chunk is
// loaded and widened once and feeds kHeads fused multiply-adds. kHeads * kVectors <= 16
// accumulators, plus kVectors V chunks and a broadcast weight, fit the 32 zmm registers.
// weights: [kHeads, padded_block_size]; accumulators: [kHeads, padded_head_size].
template <typename KV>
struct AccumulateTile {
  // Vectors of columns per pass for a tile of `heads` query heads.
  static constexpr int vectors_for(int heads) { return heads <= 2 ? 8 : heads <= 4 ? 4 : 2; }

  template <int kHeads, bool kFull>
  struct Kernel {
    static constexpr int kVectors = vectors_for(kHeads);
    static constexpr int kColumns = 16 * kVectors;

    static void run(const BlockRows<KV>& values, const float* weights, float* accumulators,
                    const NextRows& next, PrefetchStream* stream, const AttentionPlan& plan) {
      const int32_t head_size = plan.head_size;
      const int64_t row_length = plan.padded_head_size;
      const int64_t weight_stride = plan.padded_block_size;
      for (int64_t column = 0; column < head_size; column += kColumns) {
        __mmask16 lanes[kVectors];
        __m512 sums[kHeads][kVectors];
        for (int v = 0; v < kVectors; ++v) {
          lanes[v] = kFull ? __mmask16(0xFFFF) : first_lanes16(head_size - column - 16 * v);
          for (int g = 0; g < kHeads; ++g) {
            sums[g][v] = _mm512_maskz_loadu_ps(lanes[v], accumulators + g * row_length + column + 16 * v);
          }
        }
        for (int32_t t = values.begin; t < values.end; ++t) {
          if (column == 0) {
            next.prefetch(t);
            if (stream) stream->step();
          }
          const KV* value = values.rows + t * values.token_stride + column;
          __m512 chunks[kVectors];
          for (int v = 0; v < kVectors; ++v) chunks[v] = load_floats(value + 16 * v, lanes[v]);
          for (int g = 0; g < kHeads; ++g) {
            const __m512 weight = _mm512_set1_ps(weights[g * weight_stride + t]);
            for (int v = 0; v < kVectors; ++v) sums[g][v] = _mm512_fmadd_ps(weight, chunks[v], sums[g][v]);
          }
        }
        for (int v = 0; v < kVectors; ++v) {
          for (int g = 0; g < kHeads; ++g) {
            _mm512_mask_storeu_ps(accumulators + g * row_length + column + 16 * v, lanes[v], sums[g][v]);
          }
        }
      }
    }
  };
  static constexpr int kMaxHeads = 8;
  using Table = KernelTable<Kernel, kMaxHeads>;
};

// Value accumulation for bf16 caches, two tokens per instruction: vdpbf16ps multiplies 16
// pairs of bf16 and adds each pair's two products into one fp32 lane. The rows of tokens t and
// t+1 are interleaved (unpacklo/unpackhi_epi16), giving pairs (v_t[d], v_t+1[d]), and the
// weights (p_t, p_t+1) are rounded to bf16 and broadcast as one 32-bit pair. Each 32-column
// chunk of the head then lives in two accumulators in the unpack order (lane 4j + k of the
// "low" half is column 8j + k, of the "high" half column 8j + 4 + k, for j, k < 4);
// finish_accumulators restores natural order once per item. A lone last token pairs with a
// zero row (never with the slot after it, which may hold NaN).
// weights: [kHeads, padded_block_size] bf16; accumulators: [kHeads, padded_head_size].
struct Bf16PairTile {
  static constexpr int chunks_for(int heads) { return heads <= 2 ? 4 : heads <= 4 ? 2 : 1; }

  template <int kHeads, bool kFull>
  struct Kernel {
    static constexpr int kChunks = chunks_for(kHeads);

    static void run(const BlockRows<BFloat16>& values, const BFloat16* weights,
                    float* accumulators, const NextRows& next, PrefetchStream* stream,
                    const AttentionPlan& plan) {
      const int32_t head_size = plan.head_size;
      const int64_t row_length = plan.padded_head_size;
      const int64_t weight_stride = plan.padded_block_size;
      for (int64_t column = 0; column < head_size; column += 32 * kChunks) {
        __mmask32 lanes[kChunks];
        __mmask16 stored[kChunks];  // accumulator chunks that exist in the padded row
        __m512 sums[kHeads][kChunks][2];
        for (int c = 0; c < kChunks; ++c) {
          const int64_t start = column + 32 * c;
          lanes[c] = kFull ? __mmask32(0xFFFFFFFF) : first_lanes32(head_size - start);
          stored[c] = kFull || start < head_size ? __mmask16(0xFFFF) : __mmask16(0);
          for (int g = 0; g < kHeads; ++g) {
            for (int half = 0; half < 2; ++half) {
              sums[g][c][half] = _mm512_maskz_loadu_ps(stored[c], accumulators + g * row_length + start + 16 * half);
            }
          }
        }
        for (int32_t t = values.begin; t < values.end; t += 2) {
          // A lone last token reads no second row (mask 0) and gets a zero second weight.
          const bool pair = t + 1 < values.end;
          if (column == 0) {
            next.prefetch(t);
            if (pair) next.prefetch(t + 1);
            if (stream) {
              stream->step();
              stream->step();
            }
          }
          const BFloat16* first_row = values.rows + t * values.token_stride + column;
          const BFloat16* second_row = first_row + (pair ? values.token_stride : 0);
          __m512i low[kChunks], high[kChunks];
          for (int c = 0; c < kChunks; ++c) {
            const __m512i first = _mm512_maskz_loadu_epi16(lanes[c], first_row + 32 * c);
            const __m512i second = _mm512_maskz_loadu_epi16(pair ? lanes[c] : __mmask32(0), second_row + 32 * c);
            low[c] = _mm512_unpacklo_epi16(first, second);
            high[c] = _mm512_unpackhi_epi16(first, second);
          }
          const uint32_t weight_mask = pair ? 0xFFFFFFFFu : 0xFFFFu;
          for (int g = 0; g < kHeads; ++g) {
            uint32_t weights_of_pair;  // (p_t, p_t+1) as two bf16, low half first
            std::memcpy(&weights_of_pair, weights + g * weight_stride + t, sizeof(weights_of_pair));
            const __m512bh weight = reinterpret_cast<__m512bh>(
                _mm512_set1_epi32(static_cast<int>(weights_of_pair & weight_mask)));
            for (int c = 0; c < kChunks; ++c) {
              sums[g][c][0] = _mm512_dpbf16_ps(sums[g][c][0], reinterpret_cast<__m512bh>(low[c]), weight);
              sums[g][c][1] = _mm512_dpbf16_ps(sums[g][c][1], reinterpret_cast<__m512bh>(high[c]), weight);
            }
          }
        }
        for (int c = 0; c < kChunks; ++c) {
          for (int g = 0; g < kHeads; ++g) {
            for (int half = 0; half < 2; ++half) {
              _mm512_mask_storeu_ps(accumulators + g * row_length + column + 32 * c + 16 * half,
                                    stored[c], sums[g][c][half]);
            }
          }
        }
      }
    }
  };
  static constexpr int kMaxHeads = 8;
  using Table = KernelTable<Kernel, kMaxHeads>;

  // Puts `rows` accumulator rows back into natural column order, 32 columns at a time.
  static void restore_column_order(float* accumulators, int32_t rows, const AttentionPlan& plan) {
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int32_t row = 0; row < rows; ++row) {
      float* accumulator = accumulators + row * plan.padded_head_size;
      for (int64_t column = 0; column < plan.head_size; column += 32) {
        const __m512 low = _mm512_load_ps(accumulator + column);
        const __m512 high = _mm512_load_ps(accumulator + column + 16);
        _mm512_store_ps(accumulator + column, _mm512_permutex2var_ps(low, first_half, high));
        _mm512_store_ps(accumulator + column + 16, _mm512_permutex2var_ps(low, second_half, high));
      }
    }
  }
};

}  // namespace
}  // namespace paged_attn::cpu
