// Bench-only helper (compiled by bench/bench_decode.py at run time, not part of the library):
// reads every byte of the K/V blocks a paged decode call reads, in block-table order, and does
// nothing else with them. Its time is what a decode kernel with free arithmetic would take on
// the same cache, so it tells how much of the probe's streaming bandwidth the paged access
// pattern itself leaves to reach.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Sum of [data, data + bytes) as 64-byte vectors (bytes: a multiple of 256, as every block of
// the bench is), four independent chains so the loop is bounded by the loads, not the adds.
using Vector = uint64_t __attribute__((vector_size(64)));

uint64_t sum_lines(const char* data, int64_t bytes) {
  Vector sums[4] = {};
  for (int64_t offset = 0; offset + 256 <= bytes; offset += 256) {
    for (int lane = 0; lane < 4; ++lane) {
      Vector line;
      std::memcpy(&line, data + offset + 64 * lane, sizeof(line));
      sums[lane] += line;
    }
  }
  const Vector total = sums[0] + sums[1] + sums[2] + sums[3];
  uint64_t sum = 0;
  for (int word = 0; word < 8; ++word) sum += total[word];
  return sum;
}

// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], dense blocks;
// block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32. Reads the blocks that
// hold each sequence's tokens, K then V per block, the (sequence, block) pairs split evenly over
// torch's threads in order. Returns a checksum, so the reads cannot be optimised away.
int64_t paged_read(const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& seq_lens) {
  TORCH_CHECK(key_cache.is_cpu() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
              key_cache.sizes() == value_cache.sizes() && key_cache.dim() == 4,
              "paged_read wants two dense CPU caches of the same shape");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
              block_tables.is_contiguous() && seq_lens.is_contiguous(), "int32 tables expected");
  const int64_t block_size = key_cache.size(1);
  const int64_t block_bytes = key_cache.stride(0) * key_cache.element_size();
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int32_t* lengths = seq_lens.data_ptr<int32_t>();
  const char* keys = static_cast<const char*>(key_cache.data_ptr());
  const char* values = static_cast<const char*>(value_cache.data_ptr());

  std::vector<int64_t> pair_seq;  // the (sequence, logical block) pairs, in order
  std::vector<int64_t> pair_block;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t block = 0; block * block_size < lengths[seq]; ++block) {
      pair_seq.push_back(seq);
      pair_block.push_back(block);
    }
  }
  std::atomic<uint64_t> checksum{0};
  const int64_t pairs = static_cast<int64_t>(pair_seq.size());
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t first_part, int64_t end_part) {
    for (int64_t part = first_part; part < end_part; ++part) {
      uint64_t sum = 0;
      for (int64_t pair = pairs * part / threads; pair < pairs * (part + 1) / threads; ++pair) {
        const int64_t physical = table[pair_seq[pair] * max_blocks + pair_block[pair]];
        sum += sum_lines(keys + physical * block_bytes, block_bytes);
        sum += sum_lines(values + physical * block_bytes, block_bytes);
      }
      checksum += sum;
    }
  });
  return static_cast<int64_t>(checksum.load());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("paged_read", &paged_read, "reads the blocks of a paged decode call, nothing else");
}
