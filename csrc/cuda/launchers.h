// Torch-free host entry points of the CUDA kernels: check what only the CUDA path requires,
// plan, and launch on raw pointers and a cudaStream_t, taking the params structs that
// core/checks.cpp fills. nvcc compiles them (csrc/cuda/*.cu) for the GPU; g++ compiles the very
// same sources for the SIMT emulator through csrc/sim/compile_*.cpp. The ATen glue that calls
// them is cuda/op_glue.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/params.h"

namespace paged_attn::launch {

// ---- paged_attention ------------------------------------------------------------------------

enum class DecodePath : int32_t { kAuto = 0, kOnePass = 1, kSplitK = 2 };

// Knobs of the decode launch. The defaults suit a GPU; tests force each path on short contexts
// (e.g. 32-token partitions) because no device properties exist on the emulator.
struct DecodeLaunchConfig {
  DecodePath path = DecodePath::kAuto;
  int32_t partition_size = 512;  // tokens per split-K partition
  int32_t num_sms = 0;           // 0: ask the current device (the emulator says 108)
};

// How one paged_attention call runs. Split-K needs float scratch of scratch_floats() elements:
// partial outputs [num_seqs, num_heads, max_partitions, head_size], then the partitions' max and
// sum [num_seqs, num_heads, max_partitions] each.
struct DecodePlan {
  bool split_k = false;
  int32_t partition_size = 0;
  int32_t max_partitions = 1;
  int32_t head_chunks = 1;   // blocks per KV head, each serving up to 8 query heads of the group
  int64_t partial_states = 0;  // num_seqs * num_heads * max_partitions
  int64_t head_size = 0;

  int64_t scratch_floats() const { return split_k ? partial_states * (head_size + 2) : 0; }
};

// Empty when the CUDA kernels can run these arguments, else why not (unsupported head size,
// misaligned cache for 16-byte vector loads, ...).
std::string paged_attention_unsupported(const PagedAttentionParams& params);

// Chooses one pass or split-K. Auto takes split-K when one block per (sequence, KV head, head
// chunk) would leave SMs idle and the longest context spans more than one partition.
DecodePlan plan_paged_attention(const PagedAttentionParams& params,
                                const DecodeLaunchConfig& config);

// scratch: plan.scratch_floats() floats from the caller's allocator (nullptr for one pass).
void launch_paged_attention(const PagedAttentionParams& params, const DecodePlan& plan,
                            float* scratch, cudaStream_t stream);

// ---- cache ops --------------------------------------------------------------------------------

std::string write_kv_unsupported(const WriteKVParams& params);
void launch_write_kv(const WriteKVParams& params, cudaStream_t stream);

std::string copy_blocks_unsupported(const CopyBlocksParams& params);
void launch_copy_blocks(const CopyBlocksParams& params, cudaStream_t stream);

// One memcpy per run of blocks that is contiguous in both caches (cudaMemcpyAsync with
// cudaMemcpyDefault, so either side may be host memory; a plain memcpy on the emulator).
void launch_swap_blocks(const SwapBlocksParams& params, cudaStream_t stream);

}  // namespace paged_attn::launch
