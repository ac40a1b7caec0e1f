// The AVX-512 work-item kernel of paged_attention (F/BW/VL/BF16: Sapphire Rapids, Zen 4).
//
// Only this file is compiled for AVX-512 (and AMX), through a target pragma; isa.cpp decides at
// run time whether it may be called, and whether its AMX path runs on the hardware's tiles or
// on the software model of them (amx_tiles.h). Every header is
// included *before* the pragma so that the inline functions they define stay baseline code;
// the algorithm (attention_item.h) and the AMX inner loops (attention_amx.h) are included
// after it and keep internal linkage, so only this file's copy ever runs with AVX-512.
//
// Vector arithmetic: a __m512 holds 16 fp32 lanes, so a head_size row is processed in chunks
// of 16 elements, the last chunk masked (any head_size works; lanes past head_size are never
// read, since a padded cache may hold NaN there). 16-bit rows are loaded 16 elements (32
// bytes) at a time and widened to fp32 in registers; bf16 x bf16 dot products instead use
// vdpbf16ps on 32-element chunks, which multiplies pairs of bf16 exactly and adds in fp32.
// Dot products are reduced 16 at a time and accumulators stay in registers, yet bf16 takes
// 36-50 ns per (token, KV head) from L2, over half the ~60 ns its rows take from DRAM on one
// core here: memory pace needs the overlap that attention_item.h's prefetching provides.
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
// GCC 12 flags its own _mm512_cvtph_ps (avx512fintrin.h) as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/attention_item.h"

namespace paged_attn::cpu {
namespace {

// Lanes [0, count) of a 16-lane mask; count may be anything (<= 0 gives none, >= 16 all).
inline __mmask16 first_lanes16(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}
inline __mmask32 first_lanes32(int64_t count) {
  return count >= 32 ? __mmask32(0xFFFFFFFF) : count <= 0 ? __mmask32(0) : __mmask32((1u << count) - 1);
}

// 16 fp32 lanes from 16 stored elements; lanes outside `mask` read no memory and are 0.
inline __m512 load_floats(const float* source, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, source);
}
inline __m512 load_floats(const Half* source, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, source));
}
// bf16 is the top half of an fp32: widen each 16-bit lane to 32 bits and shift it up.
inline __m512 load_floats(const BFloat16* source, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, source);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
// fp8 e4m3 (1 sign, 4 exponent, 3 mantissa bits, bias 7) -> fp16 bit pattern: the sign moves
// to bit 15 and the 7 exponent+mantissa bits to bits 13..7. fp16's bias (15) exceeds e4m3's by
// 8, so that fp16 number is exactly the fp8 value / 256 (denormals included); one multiply by
// 256 restores it. e4m3 has no infinity; its NaN pattern S.1111.111 would read as 480 and is
// put back by a compare.
inline __m512 load_floats(const Float8* source, __mmask16 mask) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(mask, source));
  const __m256i magnitude = _mm256_and_si256(bytes, _mm256_set1_epi16(0x7F));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x80)), 8);
  const __m256i half_bits = _mm256_or_si256(sign, _mm256_slli_epi16(magnitude, 7));
  const __m512 value = _mm512_mul_ps(_mm512_cvtph_ps(half_bits), _mm512_set1_ps(256.0f));
  const __mmask16 is_nan = _mm256_cmpeq_epi16_mask(magnitude, _mm256_set1_epi16(0x7F));
  return _mm512_mask_mov_ps(value, is_nan, _mm512_set1_ps(NAN));
}

// e^x for x <= 0 (scores minus their maximum). e^x = 2^n * e^r with n = round(x / ln 2) and
// r = x - n ln 2 in [-ln2/2, ln2/2]; ln 2 is split in a short high part and a correction so
// that n * high is exact. e^r is its Taylor polynomial of degree 7 (truncation error below
// 1e-8 relative on that interval), and vscalefps multiplies by 2^n, flushing to 0 below the
// smallest float. Inputs under -104 (including -inf) give 0.
inline __m512 exp_floats(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.0f / 5040);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 720));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}

// Horizontal sums of 16 vectors at once. A dot product leaves 16 partial sums in a vector;
// reducing each vector alone costs about 8 shuffle/add steps, while this tree reduces 16
// vectors in 4 levels of (2 shuffles + 1 add) per pair, ~3 instructions per dot product.
// Level 1 adds the 256-bit halves of vectors 2k and 2k+1 into one vector (8 lanes each),
// level 2 adds 128-bit quarters (4 lanes each), levels 3 and 4 add within quarters. The sum of
// the vector in slot s lands in lane lane_of_slot(s) = 4 * (s % 4) + s / 4 (a 4x4 transpose,
// its own inverse): callers put the dot product they want in lane p into slot lane_of_slot(p).
constexpr int lane_of_slot(int slot) { return 4 * (slot % 4) + slot / 4; }

// One level of the tree: the sum of the two selections of a and b made by the immediates,
// whole 128-bit quarters (vshuff32x4) or elements within each quarter (vshufps).
template <int kFirst, int kSecond, bool kWithinQuarters>
inline __m512 add_selected(__m512 a, __m512 b) {
  if constexpr (kWithinQuarters) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, kFirst), _mm512_shuffle_ps(a, b, kSecond));
  } else {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, kFirst), _mm512_shuffle_f32x4(a, b, kSecond));
  }
}
constexpr auto add_halves = add_selected<_MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2), false>;
constexpr auto add_quarters = add_selected<_MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1), false>;
constexpr auto add_pairs = add_selected<_MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2), true>;
constexpr auto add_singles = add_selected<_MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1), true>;
// Levels 2-4 of the tree, given level 1's output (halves[i] = add_halves(slot 2i, slot 2i+1),
// which callers compute as soon as both slots are ready, to keep fewer vectors live).
inline __m512 sum_each_of_16(const __m512 (&halves)[8]) {
  __m512 quarters[4], pairs[2];
  for (int i = 0; i < 4; ++i) quarters[i] = add_quarters(halves[2 * i], halves[2 * i + 1]);
  for (int i = 0; i < 2; ++i) pairs[i] = add_pairs(quarters[2 * i], quarters[2 * i + 1]);
  return add_singles(pairs[0], pairs[1]);
}

// Dot products of query rows with key rows, one step (chunk of the head dimension) at a time,
// so that a caller can advance 16 independent dot products together and keep them all in
// registers. fma() leaves 16 partial sums per dot product in a vector.
// Fp32Dot: fp32 query (zero-padded, aligned) against fp32 key rows, 16 elements per step.
struct Fp32Dot {
  using Key = float;
  using Mask = __mmask16;
  using Chunk = __m512;
  static constexpr int kStep = 16;
  static constexpr int kMaxTileHeads = 16;  // heads per score tile (see ScoreRows)
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
  static constexpr int kMaxTileHeads = 1;  // multi-head tiles measured 6-12% slower cold here
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
// set and every head's pass refetched them from L2.) sum_each_of_16 then reduces the tile's
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
      for (int32_t t = begin; t < end; t += kTokens) {
        const int32_t tokens = std::min<int32_t>(kTokens, end - t);
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
          typename Dot::Chunk keys[kTokens];
          for (int i = 0; i < kTokens; ++i) keys[i] = Dot::key(key[i] + d, lanes);
          for (int h = 0; h < kHeads; ++h) {
            const typename Dot::Chunk query = dot.query(first_head + h, d, lanes);
            for (int i = 0; i < kTokens; ++i) {
              sums[h * kTokens + i] = Dot::fma(sums[h * kTokens + i], query, keys[i]);
            }
          }
          stream.step(PrefetchStream::share(kHeads * tokens, step, steps));
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

  // Tiles of 1, 2, 4, ... up to kMaxTileHeads heads; index i holds 2^i heads (and 16 >> i
  // tokens). Only those tiles are instantiated.
  static constexpr int kTileSizes = std::bit_width(static_cast<unsigned>(Dot::kMaxTileHeads));
  template <bool kFull, size_t... kIndex>
  static constexpr auto tiles(std::index_sequence<kIndex...>) {
    return std::array{&Tile<(1 << kIndex), kFull>::run...};
  }
  static constexpr auto kFullTiles = tiles<true>(std::make_index_sequence<kTileSizes>{});
  static constexpr auto kPartialTiles = tiles<false>(std::make_index_sequence<kTileSizes>{});
  // The largest tile for `heads` remaining heads.
  static int tile_index(int32_t heads) {
    return std::bit_width(static_cast<unsigned>(std::min<int32_t>(heads, Dot::kMaxTileHeads))) - 1;
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
