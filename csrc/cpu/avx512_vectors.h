// AVX-512 vector helpers of the CPU paged_attention kernel: lane masks, loads that widen any
// cache dtype to 16 fp32 lanes, e^x, and the tree that reduces 16 dot products at once.
// Part of the AVX-512 translation unit: attention_avx512.cpp includes this file under its
// target pragma, after every standard header it needs; never compiled on its own. Internal
// linkage (unnamed namespace), so no AVX-512 copy of these functions can reach other code.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/dtype_dispatch.h"

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

}  // namespace
}  // namespace paged_attn::cpu
