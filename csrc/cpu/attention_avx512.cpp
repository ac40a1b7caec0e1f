// The AVX-512 work-item kernel of paged_attention (F/BW/VL/BF16: Sapphire Rapids, Zen 4).
//
// Only this file is compiled for AVX-512, through a target pragma; isa.cpp decides at run time
// whether it may be called. Every header is included *before* the pragma so that the inline
// functions they define stay baseline code; the algorithm (attention_item.h) is included after
// it and keeps internal linkage, so only this file's copy ever runs with AVX-512.
//
// Vector arithmetic: a __m512 holds 16 fp32 lanes, so a head_size row is processed in chunks
// of 16 elements, the last chunk masked (any head_size works; lanes past head_size are never
// read, since a padded cache may hold NaN there). 16-bit rows are loaded 16 elements (32
// bytes) at a time and widened to fp32 in registers; bf16 x bf16 dot products instead use
// vdpbf16ps on 32-element chunks, which multiplies pairs of bf16 exactly and adds in fp32.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/params.h"
#include "core/softmax_state.h"
#include "cpu/attention.h"
#include "cpu/dtype_dispatch.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

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

template <typename KV>
inline void prefetch_row(const BlockRows<KV>& block, int32_t token, int32_t head_size) {
  if (block.next_rows) prefetch_bytes(block.next_rows + token * block.token_stride, head_size * sizeof(KV));
}

struct Avx512Isa {
  // scores[g * score_stride + t] = q_g . k_t for the attended tokens t of one block.
  template <typename Q, typename KV>
  static void score_block(const QueryGroup<Q>& queries, const BlockRows<KV>& keys,
                          int32_t head_size, int64_t row_length, int64_t score_stride,
                          float* scores, float* row) {
    if constexpr (std::is_same_v<Q, BFloat16> && std::is_same_v<KV, BFloat16>) {
      score_block_bf16(queries, keys, head_size, score_stride, scores);
    } else {
      for (int32_t t = keys.begin; t < keys.end; ++t) {
        prefetch_row(keys, t, head_size);
        // fp32 rows are used in place; narrower ones are widened once into `row`, which all
        // heads of the group then read from L1.
        const KV* key = keys.rows + t * keys.token_stride;
        const float* key_floats = row;
        if constexpr (std::is_same_v<KV, float>) {
          key_floats = key;
        } else {
          for (int64_t d = 0; d < head_size; d += 16) {
            _mm512_store_ps(row + d, load_floats(key + d, first_lanes16(head_size - d)));
          }
        }
        for (int32_t g = 0; g < queries.group_size; ++g) {
          const float* query = queries.converted + g * row_length;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t d = 0; d < head_size; d += 16) {
            const __m512 k = load_floats(key_floats + d, first_lanes16(head_size - d));
            sum = _mm512_fmadd_ps(_mm512_load_ps(query + d), k, sum);
          }
          scores[g * score_stride + t] = _mm512_reduce_add_ps(sum);
        }
      }
    }
  }

  // bf16 queries and keys: vdpbf16ps takes 32 bf16 of each, multiplies neighbouring pairs
  // exactly and adds both products into the 16 fp32 lanes.
  static void score_block_bf16(const QueryGroup<BFloat16>& queries,
                               const BlockRows<BFloat16>& keys, int32_t head_size,
                               int64_t score_stride, float* scores) {
    for (int32_t t = keys.begin; t < keys.end; ++t) {
      prefetch_row(keys, t, head_size);
      const BFloat16* key = keys.rows + t * keys.token_stride;
      for (int32_t g = 0; g < queries.group_size; ++g) {
        const BFloat16* query = queries.raw + g * queries.raw_head_stride;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_size; d += 32) {
          const __mmask32 lanes = first_lanes32(head_size - d);
          const __m512i q = _mm512_maskz_loadu_epi16(lanes, query + d);
          const __m512i k = _mm512_maskz_loadu_epi16(lanes, key + d);
          sum = _mm512_dpbf16_ps(sum, reinterpret_cast<__m512bh>(q), reinterpret_cast<__m512bh>(k));
        }
        scores[g * score_stride + t] = _mm512_reduce_add_ps(sum);
      }
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

  // accumulators[g] += sum_t probabilities[g * probability_stride + t] * v_t over the attended
  // tokens of one block; accumulators: [group_size, row_length].
  template <typename KV>
  static void accumulate_block(const float* probabilities, int64_t probability_stride,
                               const BlockRows<KV>& values, int32_t head_size,
                               int32_t group_size, float* accumulators, int64_t row_length,
                               float* /*row*/) {
    // Tiles of up to kTileHeads heads; tile_kernels<KV>[n - 1] handles a tile of n heads.
    for (int32_t g = 0; g < group_size; g += kTileHeads) {
      const int32_t tile_heads = std::min(group_size - g, kTileHeads);
      tile_kernels<KV>[tile_heads - 1](probabilities + g * probability_stride, probability_stride,
                                       values, head_size, accumulators + g * row_length,
                                       row_length, /*prefetch=*/g == 0);
    }
  }

  // Query heads whose accumulators a tile keeps in registers: 8 heads x 2 vectors = 16 of the
  // 32 zmm registers, plus 2 for the V chunk and 1 for the broadcast weight.
  static constexpr int32_t kTileHeads = 8;

  // Register tile of the value accumulation: for kHeads query heads and 32 output columns at a
  // time, the accumulators stay in registers while the block's V rows stream past; each V
  // chunk is loaded and widened once and feeds kHeads fused multiply-adds.
  template <int kHeads, typename KV>
  static void accumulate_tile(const float* probabilities, int64_t probability_stride,
                              const BlockRows<KV>& values, int32_t head_size,
                              float* accumulators, int64_t row_length, bool prefetch) {
    for (int64_t column = 0; column < head_size; column += 32) {
      const __mmask16 low = first_lanes16(head_size - column);
      const __mmask16 high = first_lanes16(head_size - column - 16);
      __m512 sums[kHeads][2];
      for (int g = 0; g < kHeads; ++g) {
        sums[g][0] = _mm512_maskz_loadu_ps(low, accumulators + g * row_length + column);
        sums[g][1] = _mm512_maskz_loadu_ps(high, accumulators + g * row_length + column + 16);
      }
      for (int32_t t = values.begin; t < values.end; ++t) {
        if (prefetch && column == 0) prefetch_row(values, t, head_size);
        const KV* value = values.rows + t * values.token_stride + column;
        const __m512 value_low = load_floats(value, low);
        const __m512 value_high = load_floats(value + 16, high);
        for (int g = 0; g < kHeads; ++g) {
          const __m512 weight = _mm512_set1_ps(probabilities[g * probability_stride + t]);
          sums[g][0] = _mm512_fmadd_ps(weight, value_low, sums[g][0]);
          sums[g][1] = _mm512_fmadd_ps(weight, value_high, sums[g][1]);
        }
      }
      for (int g = 0; g < kHeads; ++g) {
        _mm512_mask_storeu_ps(accumulators + g * row_length + column, low, sums[g][0]);
        _mm512_mask_storeu_ps(accumulators + g * row_length + column + 16, high, sums[g][1]);
      }
    }
  }

  template <typename KV, int... kHeadsMinusOne>
  static constexpr auto make_tile_kernels(std::integer_sequence<int, kHeadsMinusOne...>) {
    return std::array{&accumulate_tile<kHeadsMinusOne + 1, KV>...};
  }
  template <typename KV>
  static constexpr auto tile_kernels = make_tile_kernels<KV>(std::make_integer_sequence<int, kTileHeads>{});
};

}  // namespace

ItemKernel avx512_item_kernel(ScalarKind query, ScalarKind cache) {
  return select_item_kernel<Avx512Isa>(query, cache);
}

}  // namespace paged_attn::cpu

#pragma GCC pop_options
