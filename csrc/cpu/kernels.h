// Entry points of the CPU kernels, called by torch_ops.cpp with validated torch-free params
// (core/params.h). Each runs synchronously on the at::parallel_for thread pool.
#pragma once

#include "core/params.h"

namespace paged_attn::cpu {

void run_paged_attention(const PagedAttentionParams& params);
void run_write_kv(const WriteKVParams& params);
void run_copy_blocks(const CopyBlocksParams& params);
void run_swap_blocks(const SwapBlocksParams& params);

}  // namespace paged_attn::cpu
