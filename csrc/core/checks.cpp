// Argument validation shared by every backend and conversion into core/params.h structs.
// See checks.h for which checks run when.
#include "core/checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_set>
#include <utility>

namespace paged_attn {

namespace {

constexpr std::initializer_list<const char*> kCacheDims = {"num_blocks", "block_size",
                                                           "num_kv_heads", "head_size"};

CacheLayout cache_layout(const at::Tensor& cache) {
  CacheLayout layout;
  layout.num_blocks = cache.size(0);
  layout.block_size = cache.size(1);
  layout.num_kv_heads = cache.size(2);
  layout.head_size = cache.size(3);
  layout.block_stride = cache.stride(0);
  layout.token_stride = cache.stride(1);
  layout.head_stride = cache.stride(2);
  layout.dtype = scalar_kind(cache.scalar_type());
  return layout;
}

// The host copy a data check reads: the tensor itself on the CPU, a synchronous copy otherwise.
at::Tensor host_copy(const at::Tensor& tensor) {
  return tensor.is_cpu() ? tensor : tensor.cpu();
}

// Validates an optional fp8 scale: present exactly when the cache is fp8, float32 with one
// element, on the cache's device, and (when data checks run) positive and finite.
const float* fp8_scale_pointer(const char* op, const char* arg,
                               const std::optional<at::Tensor>& scale, bool cache_is_fp8,
                               const at::Device& device) {
  if (!cache_is_fp8) {
    TORCH_CHECK(!scale.has_value(), op, ": argument '", arg,
                "' is only meaningful for float8_e4m3fn caches; pass None");
    return nullptr;
  }
  TORCH_CHECK(scale.has_value(), op, ": float8_e4m3fn caches need argument '", arg,
              "' (float32 tensor of shape [1]); got None");
  Expect(op, arg, *scale).dtype(at::kFloat).device(device).contiguous();
  TORCH_CHECK(scale->numel() == 1, op, ": argument '", arg, "' must have one element, got shape ",
              scale->sizes());
  if (should_check_data(device)) {
    const float value = host_copy(*scale).item<float>();
    TORCH_CHECK(std::isfinite(value) && value > 0, op, ": argument '", arg,
                "' must be positive and finite, got ", value);
  }
  return scale->data_ptr<float>();
}

// Checks a key/value cache pair [num_blocks, block_size, num_kv_heads, head_size]: same shape,
// dtype `input_dtype` or fp8 e4m3, on `device`, contiguous in head_size. Returns the fp8 scale
// pointers, validated and present exactly when the caches are fp8.
std::pair<const float*, const float*> expect_cache_pair(
    const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache,
    at::ScalarType input_dtype, const at::Device& device,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  Expect(op, "key_cache", key_cache)
      .dims(kCacheDims)
      .dtype_in({input_dtype, at::kFloat8_e4m3fn})
      .device(device)
      .last_dim_contiguous();
  Expect(op, "value_cache", value_cache)
      .dims(kCacheDims)
      .same_shape_as(key_cache, "key_cache")
      .dtype(key_cache.scalar_type())
      .device(device)
      .last_dim_contiguous();
  const bool cache_is_fp8 = key_cache.scalar_type() == at::kFloat8_e4m3fn;
  return {fp8_scale_pointer(op, "k_scale", k_scale, cache_is_fp8, device),
          fp8_scale_pointer(op, "v_scale", v_scale, cache_is_fp8, device)};
}

void expect_block_mapping(const char* op, const at::Tensor& block_mapping,
                          const at::Device& device) {
  Expect(op, "block_mapping", block_mapping)
      .dims({"num_pairs", "2"})
      .size(1, 2, "2 (src, dst)")
      .dtype(at::kLong)
      .device(device)
      .contiguous();
}

// Checks every (src, dst) pair against the two pools and rejects mappings whose result would
// depend on the order pairs are processed in: a dst written twice, or a dst that is also a src.
void check_block_mapping_data(const char* op, const at::Tensor& block_mapping,
                              int64_t num_src_blocks, int64_t num_dst_blocks,
                              bool dst_may_be_src) {
  const at::Tensor host = host_copy(block_mapping);
  const int64_t* pairs = host.data_ptr<int64_t>();
  const int64_t num_pairs = host.size(0);
  std::unordered_set<int64_t> dsts;
  std::unordered_set<int64_t> srcs;
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t src = pairs[2 * i];
    const int64_t dst = pairs[2 * i + 1];
    TORCH_CHECK(src >= 0 && src < num_src_blocks, op, ": block_mapping[", i, "] src block ", src,
                " is outside [0, ", num_src_blocks, ")");
    TORCH_CHECK(dst >= 0 && dst < num_dst_blocks, op, ": block_mapping[", i, "] dst block ", dst,
                " is outside [0, ", num_dst_blocks, ")");
    TORCH_CHECK(dsts.insert(dst).second, op, ": block_mapping writes dst block ", dst,
                " more than once");
    srcs.insert(src);
  }
  if (dst_may_be_src) return;
  for (int64_t dst : dsts) {
    TORCH_CHECK(!srcs.count(dst), op, ": block ", dst,
                " is both a src and a dst in block_mapping; the result would depend on order");
  }
}

}  // namespace

Expect::Expect(const char* op, std::string arg, const at::Tensor& tensor)
    : op_(op), arg_(std::move(arg)), tensor_(tensor) {
  TORCH_CHECK(tensor_.defined(), where(), " is an undefined tensor");
}

std::string Expect::where() const { return std::string(op_) + ": argument '" + arg_ + "'"; }

Expect& Expect::dims(std::initializer_list<const char*> dim_names) {
  std::string expected = "[";
  for (const char* name : dim_names) {
    if (expected.size() > 1) expected += ", ";
    expected += name;
  }
  expected += "]";
  TORCH_CHECK(tensor_.dim() == static_cast<int64_t>(dim_names.size()), where(),
              " must have shape ", expected, " (", dim_names.size(), " dims), got shape ",
              tensor_.sizes());
  return *this;
}

Expect& Expect::size(int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK(tensor_.size(dim) == expected, where(), " has shape ", tensor_.sizes(), ": dim ",
              dim, " must be ", what, " = ", expected);
  return *this;
}

Expect& Expect::dtype(at::ScalarType expected) {
  TORCH_CHECK(tensor_.scalar_type() == expected, where(), " must have dtype ", expected, ", got ",
              tensor_.scalar_type());
  return *this;
}

Expect& Expect::dtype_in(std::initializer_list<at::ScalarType> allowed) {
  if (std::find(allowed.begin(), allowed.end(), tensor_.scalar_type()) != allowed.end()) {
    return *this;
  }
  std::string names;
  for (at::ScalarType type : allowed) {
    if (!names.empty()) names += ", ";
    names += c10::toString(type);
  }
  TORCH_CHECK(false, where(), " must have one of the dtypes {", names, "}, got ",
              tensor_.scalar_type());
  return *this;
}

Expect& Expect::device(const at::Device& expected) {
  TORCH_CHECK(tensor_.device() == expected, where(), " must be on device ", expected,
              " like the other arguments, got ", tensor_.device());
  return *this;
}

Expect& Expect::same_shape_as(const at::Tensor& other, const char* other_name) {
  TORCH_CHECK(tensor_.sizes() == other.sizes(), where(), " must have the shape of '", other_name,
              "' ", other.sizes(), ", got ", tensor_.sizes());
  return *this;
}

Expect& Expect::contiguous() {
  TORCH_CHECK(tensor_.is_contiguous(), where(), " must be contiguous, got strides ",
              tensor_.strides());
  return *this;
}

Expect& Expect::last_dim_contiguous() {
  TORCH_CHECK(tensor_.dim() == 0 || tensor_.size(-1) <= 1 || tensor_.stride(-1) == 1, where(),
              " must be contiguous in its last dimension, got strides ", tensor_.strides());
  return *this;
}

bool should_check_data(const at::Device& device) {
  if (device.is_cpu()) return true;
  const char* debug = std::getenv("PAGED_ATTN_DEBUG");
  return debug != nullptr && std::strcmp(debug, "0") != 0 && debug[0] != '\0';
}

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat8_e4m3fn: return ScalarKind::kFloat8E4M3;
    default: TORCH_CHECK(false, "paged_attn: unsupported dtype ", dtype);
  }
}

PagedAttentionParams make_paged_attention_params(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    double scale, int64_t max_seq_len, const std::optional<at::Tensor>& alibi_slopes,
    int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale) {
  const char* op = "paged_attention";
  Expect(op, "query", query)
      .dims({"num_seqs", "num_heads", "head_size"})
      .dtype_in({at::kFloat, at::kHalf, at::kBFloat16})
      .last_dim_contiguous();
  const at::Device device = query.device();
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_size = query.size(2);
  Expect(op, "out", out)
      .dims({"num_seqs", "num_heads", "head_size"})
      .same_shape_as(query, "query")
      .dtype(query.scalar_type())
      .device(device)
      .last_dim_contiguous();
  // Kernels read the query of a sequence while other work items already write its output.
  TORCH_CHECK(!out.is_alias_of(query), op, ": argument 'out' must not share memory with 'query'");
  const auto [k_scale_data, v_scale_data] = expect_cache_pair(
      op, key_cache, value_cache, query.scalar_type(), device, k_scale, v_scale);
  Expect(op, "key_cache", key_cache).size(3, head_size, "query's head_size");
  const int64_t num_blocks = key_cache.size(0);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  TORCH_CHECK(head_size > 0 && block_size > 0, op, ": head_size (", head_size,
              ") and block_size (", block_size, ") must be positive");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (", num_heads,
              ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
  Expect(op, "block_tables", block_tables)
      .dims({"num_seqs", "max_blocks"})
      .size(0, num_seqs, "num_seqs")
      .dtype(at::kInt)
      .device(device)
      .last_dim_contiguous();
  Expect(op, "seq_lens", seq_lens)
      .dims({"num_seqs"})
      .size(0, num_seqs, "num_seqs")
      .dtype(at::kInt)
      .device(device)
      .contiguous();
  TORCH_CHECK(max_seq_len >= 0 && max_seq_len <= INT_MAX, op, ": max_seq_len must be in [0, ",
              INT_MAX, "], got ", max_seq_len);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(sliding_window >= 0 && sliding_window <= INT_MAX, op,
              ": sliding_window must be >= 0 (0 = off), got ", sliding_window);
  TORCH_CHECK(std::isfinite(logits_soft_cap) && logits_soft_cap >= 0, op,
              ": logits_soft_cap must be >= 0 (0 = off), got ", logits_soft_cap);
  if (alibi_slopes.has_value()) {
    Expect(op, "alibi_slopes", *alibi_slopes)
        .dims({"num_heads"})
        .size(0, num_heads, "num_heads")
        .dtype(at::kFloat)
        .device(device)
        .contiguous();
  }
  PagedAttentionParams params{};
  params.k_scale = k_scale_data;
  params.v_scale = v_scale_data;

  const int64_t max_blocks = block_tables.size(1);
  if (should_check_data(device)) {
    const at::Tensor lens = host_copy(seq_lens);
    const at::Tensor tables = host_copy(block_tables);
    const int32_t* len_data = lens.data_ptr<int32_t>();
    const int32_t* table_data = tables.data_ptr<int32_t>();
    const int64_t table_stride = tables.stride(0);
    for (int64_t seq = 0; seq < num_seqs; ++seq) {
      const int64_t len = len_data[seq];
      TORCH_CHECK(len >= 0, op, ": seq_lens[", seq, "] = ", len, " is negative");
      TORCH_CHECK(len <= max_seq_len, op, ": max_seq_len (", max_seq_len,
                  ") is smaller than seq_lens[", seq, "] = ", len);
      const int64_t blocks_needed = (len + block_size - 1) / block_size;
      TORCH_CHECK(blocks_needed <= max_blocks, op, ": block_tables has ", max_blocks,
                  " columns but sequence ", seq, " (seq_len ", len, ", block_size ", block_size,
                  ") needs ", blocks_needed);
      const int64_t first_attended = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      for (int64_t b = first_attended / block_size; b < blocks_needed; ++b) {
        const int64_t block = table_data[seq * table_stride + b];
        TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", seq, "][", b,
                    "] = ", block, " is outside [0, num_blocks = ", num_blocks, ")");
      }
    }
  }

  params.out = out.data_ptr();
  params.query = query.data_ptr();
  params.key_cache = key_cache.data_ptr();
  params.value_cache = value_cache.data_ptr();
  params.block_tables = block_tables.data_ptr<int32_t>();
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  params.out_seq_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.query_seq_stride = query.stride(0);
  params.query_head_stride = query.stride(1);
  params.block_table_stride = block_tables.stride(0);
  params.key_layout = cache_layout(key_cache);
  params.value_layout = cache_layout(value_cache);
  params.num_seqs = static_cast<int32_t>(num_seqs);
  params.num_heads = static_cast<int32_t>(num_heads);
  params.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  params.head_size = static_cast<int32_t>(head_size);
  params.max_blocks_per_seq = static_cast<int32_t>(max_blocks);
  params.max_seq_len = static_cast<int32_t>(max_seq_len);
  params.query_dtype = scalar_kind(query.scalar_type());
  params.scale = static_cast<float>(scale);
  params.sliding_window = static_cast<int32_t>(sliding_window);
  params.logits_soft_cap = static_cast<float>(logits_soft_cap);
  return params;
}

WriteKVParams make_write_kv_params(
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& slot_mapping,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const char* op = "write_kv";
  Expect(op, "key", key)
      .dims({"num_tokens", "num_kv_heads", "head_size"})
      .dtype_in({at::kFloat, at::kHalf, at::kBFloat16})
      .last_dim_contiguous();
  const at::Device device = key.device();
  Expect(op, "value", value)
      .dims({"num_tokens", "num_kv_heads", "head_size"})
      .same_shape_as(key, "key")
      .dtype(key.scalar_type())
      .device(device)
      .last_dim_contiguous();
  const auto [k_scale_data, v_scale_data] = expect_cache_pair(
      op, key_cache, value_cache, key.scalar_type(), device, k_scale, v_scale);
  Expect(op, "key_cache", key_cache)
      .size(2, key.size(1), "key's num_kv_heads")
      .size(3, key.size(2), "key's head_size");
  const int64_t num_tokens = key.size(0);
  Expect(op, "slot_mapping", slot_mapping)
      .dims({"num_tokens"})
      .size(0, num_tokens, "num_tokens")
      .dtype(at::kLong)
      .device(device)
      .contiguous();
  WriteKVParams params{};
  params.k_scale = k_scale_data;
  params.v_scale = v_scale_data;

  if (should_check_data(device)) {
    const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
    const at::Tensor slots = host_copy(slot_mapping);
    const int64_t* slot_data = slots.data_ptr<int64_t>();
    std::unordered_set<int64_t> seen;
    for (int64_t token = 0; token < num_tokens; ++token) {
      const int64_t slot = slot_data[token];
      TORCH_CHECK(slot >= -1 && slot < num_slots, op, ": slot_mapping[", token, "] = ", slot,
                  " is outside the cache (valid: -1 to skip, or [0, num_blocks * block_size = ",
                  num_slots, "))");
      TORCH_CHECK(slot == -1 || seen.insert(slot).second, op, ": slot ", slot,
                  " appears more than once in slot_mapping");
    }
  }

  params.key = key.data_ptr();
  params.value = value.data_ptr();
  params.key_cache = key_cache.data_ptr();
  params.value_cache = value_cache.data_ptr();
  params.slot_mapping = slot_mapping.data_ptr<int64_t>();
  params.key_token_stride = key.stride(0);
  params.key_head_stride = key.stride(1);
  params.value_token_stride = value.stride(0);
  params.value_head_stride = value.stride(1);
  params.key_layout = cache_layout(key_cache);
  params.value_layout = cache_layout(value_cache);
  params.num_tokens = num_tokens;
  params.input_dtype = scalar_kind(key.scalar_type());
  return params;
}

CopyBlocksParams make_copy_blocks_params(
    at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  TORCH_CHECK(!key_caches.empty(), op, ": key_caches must hold at least one layer");
  TORCH_CHECK(key_caches.size() == value_caches.size(), op, ": key_caches has ",
              key_caches.size(), " layers but value_caches has ", value_caches.size());
  const at::Tensor& first_key = key_caches[0];
  const at::Tensor& first_value = value_caches[0];
  Expect(op, "key_caches[0]", first_key)
      .dims(kCacheDims)
      .dtype_in({at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn})
      .last_dim_contiguous();
  const at::Device device = first_key.device();
  Expect(op, "value_caches[0]", first_value)
      .dims(kCacheDims)
      .same_shape_as(first_key, "key_caches[0]")
      .dtype(first_key.scalar_type())
      .device(device)
      .last_dim_contiguous();

  CopyBlocksParams params;
  for (size_t layer = 0; layer < key_caches.size(); ++layer) {
    for (const auto& [caches, first, name] :
         {std::tuple(key_caches, first_key, "key_caches"),
          std::tuple(value_caches, first_value, "value_caches")}) {
      const at::Tensor& cache = caches[layer];
      const std::string arg = std::string(name) + "[" + std::to_string(layer) + "]";
      Expect(op, arg, cache)
          .dims(kCacheDims)
          .same_shape_as(first, "layer 0")
          .dtype(first.scalar_type())
          .device(device);
      TORCH_CHECK(cache.strides() == first.strides(), op, ": argument '", arg, "' has strides ",
                  cache.strides(), " but layer 0 has ", first.strides(),
                  "; every layer must share one layout");
    }
    params.key_caches.push_back(key_caches[layer].data_ptr());
    params.value_caches.push_back(value_caches[layer].data_ptr());
  }
  expect_block_mapping(op, block_mapping, device);
  if (should_check_data(device)) {
    check_block_mapping_data(op, block_mapping, first_key.size(0), first_key.size(0),
                             /*dst_may_be_src=*/false);
  }
  params.key_layout = cache_layout(first_key);
  params.value_layout = cache_layout(first_value);
  params.block_mapping = block_mapping.data_ptr<int64_t>();
  params.num_pairs = block_mapping.size(0);
  return params;
}

SwapBlocksParams make_swap_blocks_params(
    const at::Tensor& src, const at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  Expect(op, "src", src)
      .dims(kCacheDims)
      .dtype_in({at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn})
      .last_dim_contiguous();
  Expect(op, "dst", dst)
      .dims(kCacheDims)
      .dtype(src.scalar_type())
      .size(1, src.size(1), "src's block_size")
      .size(2, src.size(2), "src's num_kv_heads")
      .size(3, src.size(3), "src's head_size")
      .last_dim_contiguous();
  expect_block_mapping(op, block_mapping, at::Device(at::kCPU));
  // The mapping lives on the host, so its check costs no device sync and always runs. When src
  // and dst are different pools a block id may appear on both sides; within one pool it may not.
  check_block_mapping_data(op, block_mapping, src.size(0), dst.size(0),
                           /*dst_may_be_src=*/!src.is_alias_of(dst));

  SwapBlocksParams params;
  params.src = src.data_ptr();
  params.dst = dst.data_ptr();
  params.src_layout = cache_layout(src);
  params.dst_layout = cache_layout(dst);
  params.block_mapping = block_mapping.data_ptr<int64_t>();
  params.num_pairs = block_mapping.size(0);
  params.element_bytes = src.element_size();
  return params;
}

}  // namespace paged_attn
