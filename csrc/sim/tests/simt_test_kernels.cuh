// Kernels that exercise the SIMT emulator: correct ones whose results the tests check exactly,
// and ones with a planted bug the emulator (or ASan/UBSan) must report. A planted bug's line
// carries a `PLANTED(<name>)` comment; tests look the line up to check the reported file:line.
// Like every kernel of the project they include only kcompat.cuh, and they compile with nvcc too.
#pragma once

#include "kernels/kcompat.cuh"

namespace simt_tests {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- Barriers and shared memory ----------------------------------------------------------------

// Each block sums blockDim.x consecutive inputs (blockDim.x a power of two): load into shared
// memory, then halve the number of active threads each step; thread t adds element t + stride.
// block_sum_tree<false> is the planted bug: without the barrier after the load, thread t may read
// partial[t + stride] before thread t + stride has stored it.
template <bool kBarrierAfterLoad>
__global__ void block_sum_tree(const float* in, float* out) {
  KSHARED(float, partial, 1024);
  const unsigned t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  if constexpr (kBarrierAfterLoad) __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Two-level reduction for up to 1024 threads: each warp reduces its 32 values with xor shuffles
// (after the step with offset k, every lane holds the sum of its aligned group of 2k lanes), lane
// 0 of each warp parks the warp's sum in shared memory, and warp 0 reduces those sums.
__global__ void block_sum_warps(const float* in, float* out) {
  KSHARED(float, warp_sums, 32);
  const unsigned t = threadIdx.x;
  const unsigned lane = t % 32;
  const unsigned warp = t / 32;
  const unsigned warp_count = blockDim.x / 32;
  float v = in[blockIdx.x * blockDim.x + t];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warp_count ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Thread 0 reads static and dynamic shared memory before anyone writes it, then writes
// blockIdx.x + 1. With fresh shared memory every block reads the poison (NaN), never the
// previous block's value.
__global__ void read_before_write(float* static_seen, float* dynamic_seen) {
  KSHARED(float, fixed, 4);
  KDYN_SMEM(float, dynamic);
  if (threadIdx.x == 0) {
    static_seen[blockIdx.x] = fixed[0];
    dynamic_seen[blockIdx.x] = dynamic[0];
    fixed[0] = static_cast<float>(blockIdx.x + 1);
    dynamic[0] = static_cast<float>(blockIdx.x + 1);
  }
  __syncthreads();
}

// __syncthreads_count/_and/_or over the predicate "threadIdx.x % 3 == 0" and friends.
__global__ void barrier_votes(int* out) {
  const unsigned t = threadIdx.x;
  const int count = __syncthreads_count(t % 3 == 0);
  const int all_small = __syncthreads_and(t < 1000);
  const int any_last = __syncthreads_or(t == blockDim.x - 1);
  const int none = __syncthreads_or(0);
  if (t == 0) {
    out[0] = count;
    out[1] = all_small;
    out[2] = any_last;
    out[3] = none;
  }
}

// Every thread takes a ticket from a global counter before any sync point, recording the order in
// which the scheduler first runs threads and blocks.
__global__ void arrival_order(int* counter, int* order) {
  const int ticket = atomicAdd(counter, 1);
  order[ticket] = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
}

// ---- Warp intrinsics ------------------------------------------------------------------------

// One row of `out` per case, one column per thread of a 64-thread block (two warps). Values are
// v = 100 * warp + lane (+ 0.5), so every result names the lane it came from.
constexpr int kShuffleCases = 20;

__global__ void warp_semantics(double* out) {
  const unsigned t = threadIdx.x;
  const unsigned lane = t % 32;
  const unsigned warp = t / 32;
  const float v = 100.0f * warp + lane + 0.5f;
  double* row = out + t;
  auto put = [&](int case_index, double value) { row[case_index * blockDim.x] = value; };

  put(0, __shfl_sync(kFullMask, v, (lane * 7) % 32));
  put(1, __shfl_sync(kFullMask, v, 11, 8));
  put(2, __shfl_sync(kFullMask, v, -3, 16));
  put(3, __shfl_up_sync(kFullMask, v, 3, 8));
  put(4, __shfl_down_sync(kFullMask, v, 3, 16));
  put(5, __shfl_xor_sync(kFullMask, v, 5, 8));
  put(6, __shfl_xor_sync(kFullMask, v, 19));
  // Partial masks: the low half-warp shuffles down among itself (lanes 12..15 read lanes outside
  // the mask), the high half exchanges neighbours.
  if (lane < 16) {
    put(7, __shfl_down_sync(0x0000ffffu, v, 4));
  } else {
    put(7, __shfl_xor_sync(0xffff0000u, v, 1));
  }
  // Votes on interleaved masks: odd lanes and even lanes vote separately.
  const unsigned parity_mask = lane % 2 ? 0xaaaaaaaau : 0x55555555u;
  put(8, __ballot_sync(parity_mask, lane % 3 == 0));
  put(9, __any_sync(parity_mask, lane == 7));
  put(10, __all_sync(parity_mask, lane < 31));
  put(11, __ballot_sync(kFullMask, warp == 1 && lane > 20));
  // Other value types travel bit-exactly.
  put(12, __shfl_xor_sync(kFullMask, -1000 * static_cast<int>(lane), 3));
  put(13, static_cast<double>(
              __shfl_sync(kFullMask, static_cast<long long>(lane) << 40, (lane + 1) % 32)));
  put(14, __shfl_down_sync(kFullMask, 1.0 / (lane + 1), 1));
  put(15, __half2float(__shfl_xor_sync(kFullMask, __float2half(v), 2)));
  const __half2 pair = __shfl_sync(kFullMask, __floats2half2_rn(v, -v), 31 - lane);
  put(16, __low2float(pair) + 1000.0 * __high2float(pair));
  put(17, __bfloat162float(__shfl_up_sync(kFullMask, __float2bfloat16(v), 1)));
  const __nv_bfloat162 bpair = __shfl_sync(kFullMask, __floats2bfloat162_rn(v, 2 * v), 0);
  put(18, __low2float(bpair) + 1000.0 * __high2float(bpair));
  put(19, __shfl_xor_sync(kFullMask, static_cast<unsigned>(lane * lane), 31));
  __syncwarp();
}

// A block of 48 threads has one full and one half warp; the missing lanes count as exited.
__global__ void partial_warp(unsigned* out) {
  const unsigned ballot = __ballot_sync(kFullMask, 1);
  const unsigned active = __activemask();
  __syncwarp();
  if (threadIdx.x % 32 == 0) {
    out[2 * (threadIdx.x / 32)] = ballot;
    out[2 * (threadIdx.x / 32) + 1] = active;
  }
}

// Threads of a 3-D block are numbered x fastest and cut into warps of 32 in that order.
__global__ void thread_numbering(int* out) {
  const int linear =
      static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int lane_zero_of_my_warp = __shfl_sync(kFullMask, linear, 0);
  out[2 * linear] = linear;
  out[2 * linear + 1] = lane_zero_of_my_warp;
}

// ---- Launch plumbing ------------------------------------------------------------------------

// A template kernel with two template arguments (KLAUNCH needs it in parentheses): every thread
// scales kItems consecutive elements.
template <typename T, int kItems>
__global__ void scale_items(T* data, T factor) {
  const unsigned first = (blockIdx.x * blockDim.x + threadIdx.x) * kItems;
  for (int i = 0; i < kItems; ++i) data[first + i] *= factor;
}

// A kernel without parameters, counting its threads in a global variable.
__device__ int zero_argument_threads;

__global__ void count_threads() { atomicAdd(&zero_argument_threads, 1); }

// ---- Atomics and arithmetic intrinsics -------------------------------------------------------

__global__ void atomics_and_math(float* sum, int* maximum, float* math, unsigned char* fp8) {
  const unsigned t = threadIdx.x;
  atomicAdd(sum, 0.25f);
  atomicMax(maximum, static_cast<int>((t * 37) % 101));
  if (t == 0) {
    const __half2 h = __hfma2(__floats2half2_rn(1.5f, -2.0f), __floats2half2_rn(2.0f, 3.0f),
                              __floats2half2_rn(0.25f, 0.5f));
    math[0] = __low2float(h);
    math[1] = __high2float(h);
    math[2] = __half2float(hexp2(__float2half(3.0f)));
    math[3] = __bfloat162float(__hmul2(__floats2bfloat162_rn(1.5f, 3.0f),
                                       __floats2bfloat162_rn(2.0f, 2.0f)).y);
    math[4] = __expf(1.0f);
    math[5] = rsqrtf(16.0f);
    math[6] = __fdividef(1.0f, 8.0f);
    math[7] = exp2f(__log2f(8.0f));
    const float inputs[4] = {1000.0f, -1000.0f, 0.3f, -0.0137f};
    for (int i = 0; i < 4; ++i) {
      fp8[i] = __nv_cvt_float_to_fp8(inputs[i], __NV_SATFINITE, __NV_E4M3);
      math[8 + i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(fp8[i], __NV_E4M3)));
    }
  }
}

// ---- Planted bugs the emulator reports ---------------------------------------------------------

// In block 1, lane 5 of warp 0 calls a shuffle whose mask leaves lane 5 out.
__global__ void lane_outside_mask(float* out) {
  const unsigned mask = blockIdx.x == 1 ? ~(1u << 5) : kFullMask;
  const float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_sync(mask, v, 0);  // PLANTED(lane-outside-mask)
  }
}

// Warp 0 waits at one barrier, the other warps at another.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();  // PLANTED(divergent-barrier-a)
  } else {
    __syncthreads();  // PLANTED(divergent-barrier-b)
  }
  out[threadIdx.x] = 1.0f;
}

// Threads past `n` return before a barrier the others wait at.
__global__ void early_exit_before_barrier(float* out, int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  out[threadIdx.x] = 1.0f;
  __syncthreads();  // PLANTED(early-exit)
}

// The low half-warp waits for the whole warp in __syncwarp while the high half waits at the
// block barrier: neither can complete.
__global__ void warp_block_deadlock(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();  // PLANTED(deadlock-warp)
  } else {
    __syncthreads();  // PLANTED(deadlock-block)
  }
  out[threadIdx.x] = 1.0f;
}

// Lane 0 shuffles with lanes {0, 1}; lanes 1 and 2 with {0, 1, 2}; the rest of the warp exits.
__global__ void disagreeing_masks(float* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane > 2) return;
  const unsigned mask = lane == 0 ? 0x3u : 0x7u;
  out[lane] = __shfl_sync(mask, 1.0f, 0);  // PLANTED(disagreeing-masks)
}

__global__ void kassert_negative(const float* in) {
  const float x = in[blockIdx.x * blockDim.x + threadIdx.x];
  KASSERT(x >= 0.0f);  // PLANTED(kassert)
}

#if KCOMPAT_EMULATED
// Two bugs nvcc already rejects at build time, so they exist only for the emulator's own checks:
// device code calling a host function (that throws), and more static shared memory than a block
// may have (13000 floats = 52 000 bytes > 48 KiB).
inline float checked_sqrt(float x) {
  if (x < 0.0f) throw std::domain_error("checked_sqrt of a negative number");
  return sqrtf(x);
}

__global__ void kernel_throws(const float* in, float* out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = checked_sqrt(in[i]);
}

__global__ void too_much_shared(float* out) {
  KSHARED(float, huge, 13000);
  huge[threadIdx.x] = 1.0f;
  out[threadIdx.x] = huge[threadIdx.x];
}
#endif  // KCOMPAT_EMULATED

__global__ void uses_dynamic_shared(float* out) {
  KDYN_SMEM(float, buffer);
  buffer[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buffer[blockDim.x - 1 - threadIdx.x];
}

// ---- Planted bugs for the sanitizer build (undefined behaviour in a normal build) ------------

// The last thread of block 1 reads one element past the end of `in`.
__global__ void out_of_bounds_read(const float* in, float* out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int j = blockIdx.x == 1 ? i + 1 : i;
  out[i] = in[j] * (j < n ? 1.0f : 0.0f);  // PLANTED(oob-read)
}

// Thread 31 reads one element past a shared array, through a pointer (so only ASan's poisoning of
// the gaps between shared buffers can see it, not UBSan's array bounds check).
__global__ void shared_out_of_bounds(float* out) {
  KSHARED(float, cells, 32);
  const float* cell = cells;
  cells[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = cell[threadIdx.x + 1];  // PLANTED(shared-oob)
}

// Signed overflow for the thread whose input is INT_MAX.
__global__ void signed_overflow(const int* in, int* out) {
  out[threadIdx.x] = in[threadIdx.x] + 1;  // PLANTED(signed-overflow)
}

// ---- Benchmark ------------------------------------------------------------------------------

// 10 rounds of: a warp shuffle, a store to shared memory, a barrier, a neighbour's load. The two
// halves of `cells` alternate between rounds, so a thread never overwrites a cell that a slower
// thread of the previous round still has to read.
__global__ void sync_heavy(float* out) {
  KSHARED(float, cells, 2 * 1024);
  const unsigned t = threadIdx.x;
  float v = static_cast<float>(t);
  for (int round = 0; round < 10; ++round) {
    float* half = cells + (round % 2) * blockDim.x;
    v += __shfl_xor_sync(kFullMask, v, 1 + round % 16);
    half[t] = v;
    __syncthreads();
    v = 0.5f * (v + half[(t + 1) % blockDim.x]);
  }
  out[blockIdx.x * blockDim.x + t] = v;
}

}  // namespace simt_tests
