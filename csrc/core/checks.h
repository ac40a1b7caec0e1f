// Argument validation shared by every backend, and conversion of checked tensors into the
// torch-free params structs of core/params.h.
//
// Every check runs before any output is written, so bad input leaves all tensors untouched.
// Shape, dtype and device checks always run. Checks that read tensor data (block ids, lengths,
// slots, mappings) run always for CPU tensors; for CUDA tensors they would cost a device-to-host
// sync and break CUDA graphs, so they run only when PAGED_ATTN_DEBUG=1.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <string>

#include "core/params.h"

namespace paged_attn {

// Declarative checks on one tensor argument, one line per argument:
//   Expect("query", query, "paged_attention").dims({"num_seqs", "num_heads", "head_size"})
//       .floating().last_dim_contiguous();
// Each failure raises a RuntimeError naming the op, the argument and what was expected.
class Expect {
 public:
  Expect(const char* op, std::string arg, const at::Tensor& tensor);
  // Rank check; the names describe each dimension in the error message.
  Expect& dims(std::initializer_list<const char*> dim_names);
  Expect& size(int64_t dim, int64_t expected, const char* what);
  Expect& dtype(at::ScalarType expected);
  Expect& dtype_in(std::initializer_list<at::ScalarType> allowed);
  Expect& device(const at::Device& expected);
  Expect& same_shape_as(const at::Tensor& other, const char* other_name);
  Expect& contiguous();
  Expect& last_dim_contiguous();

 private:
  std::string where() const;
  const char* op_;
  std::string arg_;
  const at::Tensor& tensor_;
};

// True when data-reading checks should run for tensors on this device (see file header).
bool should_check_data(const at::Device& device);

ScalarKind scalar_kind(at::ScalarType dtype);

PagedAttentionParams make_paged_attention_params(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    double scale, int64_t max_seq_len, const std::optional<at::Tensor>& alibi_slopes,
    int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale);

WriteKVParams make_write_kv_params(
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& slot_mapping,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);

CopyBlocksParams make_copy_blocks_params(
    at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping);

SwapBlocksParams make_swap_blocks_params(
    const at::Tensor& src, const at::Tensor& dst, const at::Tensor& block_mapping);

}  // namespace paged_attn
