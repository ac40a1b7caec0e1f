// Torch-free launcher of the decode kernels (kernels/decode_attention.cuh): the CUDA-only
// argument checks, the one-pass / split-K plan, the choice of instantiation and the launches.
// Instantiated for {float, half, bf16} queries x {same-type, fp8} caches x 7 head sizes, plus
// one reduce kernel per query type.
#include "cuda/alignment.h"
#include "cuda/dispatch.h"
#include "cuda/launchers.h"
#include "kernels/decode_attention.cuh"
#include "kernels/kcompat.cuh"

#include <algorithm>
#include <climits>
#include <stdexcept>

namespace paged_attn::launch {

namespace {

using kernels::DecodeKernelParams;
using kernels::kMaxHeadsPerBlock;
using DecodeHeadSizes = IntSet<64, 80, 96, 112, 128, 192, 256>;
using DecodeKernel = void (*)(DecodeKernelParams);

DecodeKernel select_decode_kernel(const PagedAttentionParams& params) {
  return with_value_and_cache_types<CudaElementTypes>(
      params.query_dtype, params.key_layout.dtype, [&](auto query_tag, auto cache_tag) {
        using scalar_t = typename decltype(query_tag)::type;
        using cache_t = typename decltype(cache_tag)::type;
        return with_int(params.head_size, DecodeHeadSizes{}, [](auto head_size) -> DecodeKernel {
          return &kernels::paged_decode_kernel<scalar_t, cache_t, decltype(head_size)::value>;
        });
      });
}

DecodeKernel select_reduce_kernel(const PagedAttentionParams& params) {
  return with_value_type<CudaElementTypes>(params.query_dtype, [](auto query_tag) -> DecodeKernel {
    return &kernels::paged_decode_reduce_kernel<typename decltype(query_tag)::type>;
  });
}

}  // namespace

std::string paged_attention_unsupported(const PagedAttentionParams& params) {
  if (!DecodeHeadSizes::contains(params.head_size)) {
    return "head_size " + std::to_string(params.head_size) +
           " is not supported by the CUDA kernels; supported head sizes: " +
           DecodeHeadSizes::describe();
  }
  std::string error = cache_alignment_error("key_cache", params.key_cache, params.key_layout);
  if (error.empty()) {
    error = cache_alignment_error("value_cache", params.value_cache, params.value_layout);
  }
  return error;
}

DecodePlan plan_paged_attention(const PagedAttentionParams& params,
                                const DecodeLaunchConfig& config) {
  if (config.partition_size <= 0) {
    throw std::invalid_argument("paged_attention: partition_size must be positive, got " +
                                std::to_string(config.partition_size));
  }
  if (params.num_seqs > 65535) {
    throw std::invalid_argument("paged_attention: the CUDA grid allows 65535 sequences per call, got " +
                                std::to_string(params.num_seqs));
  }
  DecodePlan plan;
  plan.head_size = params.head_size;
  plan.head_chunks = (params.queries_per_kv() + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  const int64_t partitions_needed =
      (static_cast<int64_t>(params.max_seq_len) + config.partition_size - 1) / config.partition_size;
  const int64_t one_pass_blocks =
      static_cast<int64_t>(params.num_seqs) * params.num_kv_heads * plan.head_chunks;
  const int num_sms = config.num_sms > 0 ? config.num_sms : knum_sms();
  switch (config.path) {
    case DecodePath::kOnePass: plan.split_k = false; break;
    case DecodePath::kSplitK: plan.split_k = true; break;
    case DecodePath::kAuto: plan.split_k = partitions_needed > 1 && one_pass_blocks < num_sms; break;
  }
  if (plan.split_k) {
    plan.partition_size = config.partition_size;
    plan.max_partitions = static_cast<int32_t>(std::max<int64_t>(partitions_needed, 1));
    if (partitions_needed > 65535) {
      throw std::invalid_argument(
          "paged_attention: max_seq_len " + std::to_string(params.max_seq_len) + " needs " +
          std::to_string(partitions_needed) + " partitions of " +
          std::to_string(config.partition_size) + " tokens; the grid allows 65535");
    }
  } else {
    plan.partition_size = INT32_MAX;  // one partition spans any context
    plan.max_partitions = 1;
  }
  plan.partial_states = static_cast<int64_t>(params.num_seqs) * params.num_heads * plan.max_partitions;
  return plan;
}

void launch_paged_attention(const PagedAttentionParams& params, const DecodePlan& plan,
                            float* scratch, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.num_heads == 0) return;
  DecodeKernelParams kernel_params{};
  kernel_params.args = params;
  kernel_params.partition_size = plan.partition_size;
  kernel_params.max_partitions = plan.max_partitions;
  kernel_params.queries_per_kv = params.queries_per_kv();
  kernel_params.head_chunks = plan.head_chunks;
  kernel_params.split_k = plan.split_k;
  if (plan.split_k) {
    kernel_params.partial_out = scratch;
    kernel_params.partial_max = scratch + plan.partial_states * plan.head_size;
    kernel_params.partial_sum = kernel_params.partial_max + plan.partial_states;
  }
  const dim3 grid(params.num_kv_heads * plan.head_chunks, params.num_seqs, plan.max_partitions);
  const DecodeKernel decode = select_decode_kernel(params);
  KLAUNCH(decode, grid, kernels::kDecodeThreads, 0, stream, kernel_params);
  if (plan.split_k) {
    const DecodeKernel reduce = select_reduce_kernel(params);
    KLAUNCH(reduce, dim3(params.num_heads, params.num_seqs), kernels::kReduceThreads, 0, stream,
            kernel_params);
  }
}

}  // namespace paged_attn::launch
