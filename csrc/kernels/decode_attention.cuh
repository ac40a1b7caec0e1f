// Decode attention over a paged KV cache (one query token per sequence): device code.
//
// paged_decode_kernel: one thread block per (sequence, KV head, partition of the context). The
//   block serves every query head of the KV head's GQA group (up to kMaxHeadsPerBlock of them;
//   bigger groups are split over gridDim.x), so each K/V row is read from memory once per group.
//   It walks its tokens in tiles and keeps a single-pass online softmax (SoftmaxState) per query
//   head. Shared memory holds one tile, the group's queries and a window of block-table entries,
//   so it does not grow with the context length.
// paged_decode_reduce_kernel: the split-K (flash-decoding) combine. With one partition per
//   sequence the decode kernel writes the output directly and this kernel is not launched.
//
// Numbers are float32 inside the kernels whatever the storage type; fp8 caches are scaled by
// k_scale / v_scale, read on the device.
#pragma once

#include "core/params.h"
#include "core/softmax_state.h"
#include "kernels/element_types.cuh"
#include "kernels/kcompat.cuh"

#include <algorithm>
#include <cstdint>

namespace paged_attn::kernels {

inline constexpr int kDecodeThreads = 128;
inline constexpr int kDecodeWarps = kDecodeThreads / 32;
// Query heads one block serves; a GQA group of more heads takes ceil(group / 8) blocks per KV head.
inline constexpr int kMaxHeadsPerBlock = 8;
// Block-table entries staged in shared memory at a time: more than the blocks any tile spans.
inline constexpr int kTableStage = 64;
inline constexpr int kReduceThreads = 64;

// Everything one decode launch needs: the validated op arguments plus the launch plan.
struct DecodeKernelParams {
  PagedAttentionParams args;
  float* partial_out;  // [num_seqs, num_heads, max_partitions, head_size]; split-K only
  float* partial_max;  // [num_seqs, num_heads, max_partitions]; split-K only
  float* partial_sum;  // [num_seqs, num_heads, max_partitions]; split-K only
  int32_t partition_size;  // tokens per partition; one pass: INT32_MAX (the whole context)
  int32_t max_partitions;  // gridDim.z
  int32_t queries_per_kv;  // query heads per KV head (the GQA group)
  int32_t head_chunks;     // ceil(queries_per_kv / kMaxHeadsPerBlock)
  bool split_k;            // write partial states for the reduce kernel instead of `out`
};

// Token positions [begin, end) of one partition that the query attends: inside
// [partition * partition_size, (partition + 1) * partition_size), below seq_len and (with a
// sliding window) at or after seq_len - sliding_window.
struct TokenRange {
  int32_t begin;
  int32_t end;
};

__device__ __forceinline__ TokenRange partition_tokens(int32_t seq_len, int32_t sliding_window,
                                                       int32_t partition, int32_t partition_size) {
  const int64_t first_attended = sliding_window > 0 ? std::max(0, seq_len - sliding_window) : 0;
  const int64_t start = static_cast<int64_t>(partition) * partition_size;
  const int64_t stop = std::min<int64_t>(start + partition_size, seq_len);
  return {static_cast<int32_t>(std::max(start, first_attended)), static_cast<int32_t>(stop)};
}

// Partitions a sequence of seq_len tokens occupies; the reduce kernel merges exactly these.
__device__ __forceinline__ int32_t partition_count(int32_t seq_len, int32_t partition_size) {
  return static_cast<int32_t>((static_cast<int64_t>(seq_len) + partition_size - 1) / partition_size);
}

// Compile-time geometry of one instantiation. One "token group" of kLanesPerToken consecutive
// lanes reads one token's K and V rows: the row is HEAD_SIZE * sizeof(cache_t) bytes, i.e.
// kRowVecs 16-byte vectors, and lane l of the group takes vectors l, l + kLanesPerToken, ...,
// so in every round the group's lanes read adjacent vectors (one coalesced segment per row).
// With kDecodeThreads / kLanesPerToken groups, a tile is that many tokens.
template <typename cache_t, int HEAD_SIZE>
struct DecodeGeometry {
  static constexpr int kVecElems = kElemsPerVec<cache_t>;
  static_assert(HEAD_SIZE % kVecElems == 0, "a K/V row must be whole 16-byte vectors");
  static constexpr int kRowVecs = HEAD_SIZE / kVecElems;
  // The largest power of two <= min(kRowVecs, 8): 8 lanes, or 4 for the short fp8 rows of 4-7
  // vectors. A power of two so the group's shuffle reduction stays inside its aligned lanes.
  static constexpr int kLanesPerToken = kRowVecs >= 8 ? 8 : 4;
  static_assert(kRowVecs >= kLanesPerToken, "head_size too small for a token group");
  static constexpr int kVecsPerLane = (kRowVecs + kLanesPerToken - 1) / kLanesPerToken;
  static constexpr int kTileTokens = kDecodeThreads / kLanesPerToken;  // 16 or 32
  static_assert(kTileTokens <= 32, "the per-head tile softmax gives each lane one token");
  // The output accumulators, in float4 quads of head dims: thread t owns quads t, t + 128, ...
  // of the block's [heads, HEAD_SIZE / 4] outputs.
  static constexpr int kQuadsPerHead = HEAD_SIZE / 4;
  static constexpr int kAccQuads =
      (kMaxHeadsPerBlock * kQuadsPerHead + kDecodeThreads - 1) / kDecodeThreads;
};

__device__ __forceinline__ float4 operator*(float4 a, float s) {
  return make_float4(a.x * s, a.y * s, a.z * s, a.w * s);
}

__device__ __forceinline__ void fma_into(float4& acc, float s, float4 v) {
  acc.x += s * v.x;
  acc.y += s * v.y;
  acc.z += s * v.z;
  acc.w += s * v.w;
}

// Writes 4 consecutive output elements; `out` has the alignment of scalar_t only.
template <typename scalar_t>
__device__ __forceinline__ void store_quad(scalar_t* out, float4 values) {
  out[0] = from_float<scalar_t>(values.x);
  out[1] = from_float<scalar_t>(values.y);
  out[2] = from_float<scalar_t>(values.z);
  out[3] = from_float<scalar_t>(values.w);
}

// The logit of one (query head, token) pair from its raw q.k: scale (times the fp8 k_scale),
// then soft-capping, then the ALiBi bias (slope 0 without ALiBi).
__device__ __forceinline__ float finish_logit(float dot, float logit_scale, float soft_cap,
                                              float alibi_slope, int32_t position,
                                              int32_t seq_len) {
  float logit = dot * logit_scale;
  if (soft_cap > 0.0f) logit = soft_cap * tanhf(logit / soft_cap);
  return logit + alibi_slope * static_cast<float>(position - (seq_len - 1));
}

template <typename scalar_t, typename cache_t, int HEAD_SIZE>
__global__ void __launch_bounds__(kDecodeThreads)
    paged_decode_kernel(const DecodeKernelParams params) {
  using Geometry = DecodeGeometry<cache_t, HEAD_SIZE>;
  constexpr int kLanes = Geometry::kLanesPerToken;
  constexpr int kTile = Geometry::kTileTokens;
  constexpr int kVecElems = Geometry::kVecElems;
  const PagedAttentionParams& args = params.args;

  const int32_t seq = blockIdx.y;
  const int32_t kv_head = blockIdx.x / params.head_chunks;
  const int32_t chunk = blockIdx.x % params.head_chunks;
  const int32_t partition = blockIdx.z;
  const int32_t seq_len = args.seq_lens[seq];
  // Partitions past the end of this sequence are never read by the reduce kernel.
  if (params.split_k && partition >= partition_count(seq_len, params.partition_size)) return;
  const TokenRange tokens =
      partition_tokens(seq_len, args.sliding_window, partition, params.partition_size);
  const int32_t first_head = kv_head * params.queries_per_kv + chunk * kMaxHeadsPerBlock;
  const int32_t heads_left = params.queries_per_kv - chunk * kMaxHeadsPerBlock;
  const int32_t heads = heads_left < kMaxHeadsPerBlock ? heads_left : kMaxHeadsPerBlock;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group = tid / kLanes;          // the tile token this thread's group loads
  const int lane_in_group = tid % kLanes;  // which 16-byte vectors of the row it loads

  // float4-typed, so the 16-byte shared memory accesses are aligned by the type itself.
  constexpr int kQuads = Geometry::kQuadsPerHead;
  KSHARED(float4, queries, kMaxHeadsPerBlock * kQuads);  // [heads, HEAD_SIZE / 4]
  KSHARED(float4, values, kTile * kQuads);               // [tile tokens, HEAD_SIZE / 4], V as float
  KSHARED(float, scores, kMaxHeadsPerBlock * kTile);     // [heads, tile tokens]: logits, then p
  KSHARED(int32_t, table, kTableStage);                  // block_tables[seq][stage_first + i]
  KSHARED(float, acc_rescale, kMaxHeadsPerBlock);        // per head: running acc factor
  KSHARED(float, tile_rescale, kMaxHeadsPerBlock);       // per head: this tile's factor

  // The queries may have any alignment (e.g. slices of a fused qkv): scalar loads, once.
  for (int quad = tid; quad < heads * kQuads; quad += kDecodeThreads) {
    const int head = first_head + quad / kQuads;
    const scalar_t* q = static_cast<const scalar_t*>(args.query) + seq * args.query_seq_stride +
                        head * args.query_head_stride + (quad % kQuads) * 4;
    queries[quad] = make_float4(to_float(q[0]), to_float(q[1]), to_float(q[2]), to_float(q[3]));
  }

  const float logit_scale = args.scale * (args.k_scale != nullptr ? *args.k_scale : 1.0f);
  const cache_t* key_base = static_cast<const cache_t*>(args.key_cache) +
                            kv_head * args.key_layout.head_stride;
  const cache_t* value_base = static_cast<const cache_t*>(args.value_cache) +
                              kv_head * args.value_layout.head_stride;
  const int32_t* table_row = args.block_tables + seq * args.block_table_stride;

  // Warp w owns the running softmax state of heads w and w + kDecodeWarps (every lane holds a
  // copy); the accumulators live with the threads that own the output quads.
  constexpr int kHeadsPerWarp = kMaxHeadsPerBlock / kDecodeWarps;
  SoftmaxState states[kHeadsPerWarp];
  float4 acc[Geometry::kAccQuads];
#pragma unroll
  for (int a = 0; a < Geometry::kAccQuads; ++a) acc[a] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  // Calls fn(a, head, dim_quad) for every output quad this thread owns: acc[a] accumulates quad
  // tid + a * kDecodeThreads of the block's [heads, kQuads] outputs.
  const auto for_each_owned_quad = [&](auto&& fn) {
#pragma unroll
    for (int a = 0; a < Geometry::kAccQuads; ++a) {
      const int quad = tid + a * kDecodeThreads;
      if (quad < heads * kQuads) fn(a, quad / kQuads, quad % kQuads);
    }
  };

  int32_t stage_first = 0;  // the first table column held in `table`
  bool staged = false;
  for (int32_t tile_begin = tokens.begin; tile_begin < tokens.end; tile_begin += kTile) {
    const int tile_len = std::min<int32_t>(kTile, tokens.end - tile_begin);
    const int32_t block_size = static_cast<int32_t>(args.key_layout.block_size);
    const int32_t first_column = tile_begin / block_size;
    const int32_t last_column = (tile_begin + tile_len - 1) / block_size;
    // Restage when the tile runs past the staged columns; the previous tile's last barrier
    // guarantees nobody still reads the old entries. Columns before first_column may be -1
    // (blocks outside the sliding window) and are never staged.
    if (!staged || last_column >= stage_first + kTableStage) {
      stage_first = first_column;
      staged = true;
      for (int i = tid; i < kTableStage && stage_first + i < args.max_blocks_per_seq;
           i += kDecodeThreads) {
        table[i] = table_row[stage_first + i];
      }
      __syncthreads();
    }

    // Phase 1: group `group` loads the K and V rows of token tile_begin + group with 16-byte
    // vectors, stores V (as float) in shared memory and computes q.k for every head of the block.
    const bool has_token = group < tile_len;
    const int32_t position = tile_begin + group;
    float keys[Geometry::kVecsPerLane][kVecElems] = {};
    if (has_token) {
      const int64_t physical = table[position / block_size - stage_first];
      KASSERT(physical >= 0 && physical < args.key_layout.num_blocks);
      const int64_t offset = position % block_size;
      const cache_t* key_row = key_base + physical * args.key_layout.block_stride +
                               offset * args.key_layout.token_stride;
      const cache_t* value_row = value_base + physical * args.value_layout.block_stride +
                                 offset * args.value_layout.token_stride;
#pragma unroll
      for (int j = 0; j < Geometry::kVecsPerLane; ++j) {
        const int vec = lane_in_group + j * kLanes;
        if (Geometry::kRowVecs % kLanes == 0 || vec < Geometry::kRowVecs) {
          unpack_to_float<cache_t>(load_vec(key_row + vec * kVecElems), keys[j]);
          float value[kVecElems];
          unpack_to_float<cache_t>(load_vec(value_row + vec * kVecElems), value);
#pragma unroll
          for (int e = 0; e < kVecElems; e += 4) {
            values[group * kQuads + (vec * kVecElems + e) / 4] =
                make_float4(value[e], value[e + 1], value[e + 2], value[e + 3]);
          }
        }
      }
    }
    for (int h = 0; h < heads; ++h) {
      float dot = 0.0f;
      if (has_token) {
#pragma unroll
        for (int j = 0; j < Geometry::kVecsPerLane; ++j) {
          const int vec = lane_in_group + j * kLanes;
          if (Geometry::kRowVecs % kLanes == 0 || vec < Geometry::kRowVecs) {
#pragma unroll
            for (int e = 0; e < kVecElems; e += 4) {
              const float4 q = queries[h * kQuads + (vec * kVecElems + e) / 4];
              dot += q.x * keys[j][e] + q.y * keys[j][e + 1] + q.z * keys[j][e + 2] +
                     q.w * keys[j][e + 3];
            }
          }
        }
      }
      // Sum the group's partial dot products: xor offsets below kLanes stay inside the
      // group's aligned lanes, and every lane ends with the full sum.
#pragma unroll
      for (int offset = kLanes / 2; offset > 0; offset /= 2) {
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      }
      if (has_token && lane_in_group == 0) {
        const float slope = args.alibi_slopes != nullptr ? args.alibi_slopes[first_head + h] : 0.0f;
        scores[h * kTile + group] =
            finish_logit(dot, logit_scale, args.logits_soft_cap, slope, position, seq_len);
      }
    }
    __syncthreads();

    // Phase 2: per head, the tile's softmax state (lane = token) is merged into the running
    // state; the merge's two factors rescale the running accumulators and this tile's sum.
#pragma unroll
    for (int k = 0; k < kHeadsPerWarp; ++k) {
      const int h = warp + k * kDecodeWarps;
      if (h >= heads) continue;
      const float logit = lane < tile_len ? scores[h * kTile + lane] : -INFINITY;
      float tile_max = logit;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float p = lane < tile_len ? expf(logit - tile_max) : 0.0f;
      float tile_sum = p;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
      }
      if (lane < tile_len) scores[h * kTile + lane] = p;
      const SoftmaxState::Rescale rescale = states[k].merge(SoftmaxState{tile_max, tile_sum});
      if (lane == 0) {
        acc_rescale[h] = rescale.self;
        tile_rescale[h] = rescale.other;
      }
    }
    __syncthreads();

    // Phase 3: acc = acc * acc_rescale + tile_rescale * sum_t p_t * V_t, per owned output quad.
    for_each_owned_quad([&](int a, int h, int dim_quad) {
      float4 tile_acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int t = 0; t < tile_len; ++t) {
        fma_into(tile_acc, scores[h * kTile + t], values[t * kQuads + dim_quad]);
      }
      acc[a] = acc[a] * acc_rescale[h];
      fma_into(acc[a], tile_rescale[h], tile_acc);
    });
    __syncthreads();
  }

  // Epilogue. One pass: out = acc * v_scale / sum. Split-K: the unnormalized acc * v_scale and
  // the state (max, sum) for the reduce kernel. The warp owning a head publishes its factor.
  const float v_scale = args.v_scale != nullptr ? *args.v_scale : 1.0f;
  const int64_t state_index_base =
      (static_cast<int64_t>(seq) * args.num_heads + first_head) * params.max_partitions + partition;
#pragma unroll
  for (int k = 0; k < kHeadsPerWarp; ++k) {
    const int h = warp + k * kDecodeWarps;
    if (h >= heads || lane != 0) continue;
    if (params.split_k) {
      params.partial_max[state_index_base + h * params.max_partitions] = states[k].max;
      params.partial_sum[state_index_base + h * params.max_partitions] = states[k].sum;
      acc_rescale[h] = v_scale;
    } else {
      acc_rescale[h] = v_scale * states[k].inverse_sum();
    }
  }
  __syncthreads();
  for_each_owned_quad([&](int a, int h, int dim_quad) {
    const float4 result = acc[a] * acc_rescale[h];
    if (params.split_k) {
      float4* partial = reinterpret_cast<float4*>(
          params.partial_out + (state_index_base + h * params.max_partitions) * HEAD_SIZE);
      partial[dim_quad] = result;
    } else {
      store_quad(static_cast<scalar_t*>(args.out) + seq * args.out_seq_stride +
                     (first_head + h) * args.out_head_stride + dim_quad * 4,
                 result);
    }
  });
}

// Split-K combine: one block per (query head, sequence); thread t owns output quads t, t + 64, ...
// and folds every partition's (max, sum, acc) into one SoftmaxState with the same merge() as the
// decode kernel's inner loop. Reads only the partitions the sequence occupies, in a streaming
// loop, so nothing grows with the context.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    paged_decode_reduce_kernel(const DecodeKernelParams params) {
  const PagedAttentionParams& args = params.args;
  const int32_t head = blockIdx.x;
  const int32_t seq = blockIdx.y;
  const int32_t head_size = args.head_size;
  const int32_t partitions = partition_count(args.seq_lens[seq], params.partition_size);
  const int64_t state_base =
      (static_cast<int64_t>(seq) * args.num_heads + head) * params.max_partitions;
  for (int dim = threadIdx.x * 4; dim < head_size; dim += kReduceThreads * 4) {
    SoftmaxState total;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int32_t p = 0; p < partitions; ++p) {
      const SoftmaxState partial{params.partial_max[state_base + p], params.partial_sum[state_base + p]};
      const SoftmaxState::Rescale rescale = total.merge(partial);
      const float4 partial_acc =
          *reinterpret_cast<const float4*>(params.partial_out + (state_base + p) * head_size + dim);
      acc = acc * rescale.self;
      fma_into(acc, rescale.other, partial_acc);
    }
    store_quad(static_cast<scalar_t*>(args.out) + seq * args.out_seq_stride +
                   head * args.out_head_stride + dim,
               acc * total.inverse_sum());
  }
}

}  // namespace paged_attn::kernels
