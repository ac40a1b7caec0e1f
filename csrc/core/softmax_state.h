// The running state of a single-pass (online) softmax, shared by the CPU and CUDA kernels.
//
// A state summarises a set of scores s_i by their maximum m and by d = sum_i exp(s_i - m).
// The attention output over that set is acc / d, where acc = sum_i exp(s_i - m) * v_i is kept
// by the caller (a row of head_size floats on the CPU, a slice of registers on the GPU), so the
// struct itself is two floats. merge() folds another state into this one and returns the two
// factors the caller multiplies its own and the other state's accumulators by. The same merge
// serves the inner loop (this state += one block of scores) and the split-K combine
// (this state += one partition of the context).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PA_HOST_DEVICE __host__ __device__
#else
#define PA_HOST_DEVICE
#endif

namespace paged_attn {

struct SoftmaxState {
  float max = -INFINITY;  // largest score folded in so far; -inf while empty
  float sum = 0.0f;       // sum of exp(score - max) over the scores folded in so far

  // How the two accumulators of a merge are rescaled onto the merged maximum:
  // merged_acc = self * this_acc + other * other_acc.
  struct Rescale {
    float self;
    float other;
  };

  PA_HOST_DEVICE bool empty() const { return sum == 0.0f; }

  // Folds `other` into this state. Two empty states stay empty (and the factors are 1, so the
  // zero accumulators stay zero instead of becoming exp(-inf - -inf) = NaN).
  PA_HOST_DEVICE Rescale merge(const SoftmaxState& other) {
    const float merged_max = fmaxf(max, other.max);
    if (merged_max == -INFINITY) return {1.0f, 1.0f};
    const Rescale rescale{expf(max - merged_max), expf(other.max - merged_max)};
    max = merged_max;
    sum = sum * rescale.self + other.sum * rescale.other;
    return rescale;
  }

  // 1 / sum, the factor that turns an accumulator into the attention output; 0 for an empty
  // state, whose output row is all zeros.
  PA_HOST_DEVICE float inverse_sum() const { return sum > 0.0f ? 1.0f / sum : 0.0f; }
};

}  // namespace paged_attn
