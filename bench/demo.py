"""`make demo`: the paged KV cache end to end on the CPU, in well under a minute.

Part 1 (transformers): a small random-weight Llama-style model generates for a left-padded
batch of prompts of different lengths, once stock (sdpa + DynamicCache) and once through
"paged_attn" with a PagedKVCache; the greedy tokens must be identical. It then prints the KV
bytes the paged cache held at its peak against what pre-allocating every row at the maximum
length would reserve, and against the stock DynamicCache (which stores the padding too).

Part 2 (the op): a Llama-2-7B-shaped decode batch (32 query heads, 32 KV heads, head 128,
block 16, mixed lengths, fp32) runs the `paged_attention` op, and the demo prints its max error
against the float64 reference and its time against gather-then-SDPA (copy the pages into a
contiguous tensor per sequence, then `scaled_dot_product_attention`), medians of repeats.

Run: .venv/bin/python bench/demo.py
"""

import copy
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import paged_attn
import paged_attn.hf  # noqa: F401  (registers "paged_attn")
from paged_attn import PagedKVCache, reference

PROMPT_LENGTHS = (37, 5, 22, 61, 14, 48)
NEW_TOKENS = 32
DEMO_MAX_LENGTH = 2048  # what a max-length server would reserve per row
LLAMA_7B_DECODE_LENGTHS = (1, 15, 16, 17, 300, 1024, 2047, 777, 513, 64)
REPEATS = 5


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:8.2f} MiB"


def small_llama():
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    with torch.no_grad():
        stock.lm_head.weight.mul_(8.0)  # random weights nearly tie the logits; spread them
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged_attn")
    paged.load_state_dict(stock.state_dict())
    return stock, paged.eval()


def left_padded_prompts(vocab_size: int):
    width = max(PROMPT_LENGTHS)
    input_ids = torch.randint(1, vocab_size, (len(PROMPT_LENGTHS), width))
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        attention_mask[row, width - length:] = 1
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@torch.no_grad()
def transformers_demo() -> bool:
    stock, paged = small_llama()
    input_ids, attention_mask = left_padded_prompts(stock.config.vocab_size)
    settings = dict(attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    dense_cache = DynamicCache(config=stock.config)
    expected = stock.generate(input_ids, past_key_values=dense_cache, **settings)
    cache = PagedKVCache.from_model(paged, memory_budget_bytes=64 * 2**20, block_size=16)
    actual = paged.generate(input_ids, past_key_values=cache, **settings)
    identical = torch.equal(actual, expected)

    rows, layers = len(PROMPT_LENGTHS), len(cache.layers)
    bytes_per_token = 2 * layers * cache.num_kv_heads * cache.head_dim * cache.dtype.itemsize
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
    print("== transformers: LlamaForCausalLM (random weights, 4 layers, hidden 256, 8 heads / "
          "4 KV heads, fp32)")
    print(f"   prompts of {list(PROMPT_LENGTHS)} tokens, left-padded; {NEW_TOKENS} new tokens each, "
          "greedy")
    print(f"   greedy tokens of paged_attn + PagedKVCache identical to stock sdpa + DynamicCache: "
          f"{identical}")
    print("   KV memory (keys + values, all layers):")
    print(f"     paged cache, peak held     {mib(cache.peak_kv_bytes)}  "
          f"({cache.peak_used_blocks} blocks of {cache.block_size} tokens)")
    print(f"     tokens actually stored     {mib(sum(map(cache.seq_len, cache.batch)) * bytes_per_token)}")
    print(f"     stock DynamicCache         {mib(dense_bytes)}  (every row as long as the longest, "
          "padding included)")
    print(f"     max-length pre-allocation  {mib(rows * DEMO_MAX_LENGTH * bytes_per_token)}  "
          f"({rows} rows x {DEMO_MAX_LENGTH} tokens)")
    return identical


def llama_7b_decode_batch():
    """A shuffled-block paged cache and one query per sequence, shaped like Llama-2-7B decode."""
    num_heads, head_dim, block_size = 32, 128, 16
    blocks_per_seq = [-(-length // block_size) for length in LLAMA_7B_DECODE_LENGTHS]
    num_blocks = sum(blocks_per_seq)
    key_cache = torch.randn(num_blocks, block_size, num_heads, head_dim)
    value_cache = torch.randn(num_blocks, block_size, num_heads, head_dim)
    shuffled = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(blocks_per_seq), max(blocks_per_seq)), -1, dtype=torch.int32)
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = torch.tensor(shuffled[:count], dtype=torch.int32)
        shuffled = shuffled[count:]
    seq_lens = torch.tensor(LLAMA_7B_DECODE_LENGTHS, dtype=torch.int32)
    query = torch.randn(len(blocks_per_seq), num_heads, head_dim)
    return query, key_cache, value_cache, block_tables, seq_lens


def gather_then_sdpa(
    query: torch.Tensor,         # [num_seqs, num_heads, head_dim]
    key_cache: torch.Tensor,     # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,   # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,      # [num_seqs] int32
) -> torch.Tensor:               # [num_seqs, num_heads, head_dim]
    """The baseline without a paged kernel: copy each sequence's pages out, then SDPA.

    Sequence by sequence, so it copies and attends only real tokens (a padded batch would do
    several times more work on these mixed lengths).
    """
    block_size = key_cache.shape[1]
    out = torch.empty_like(query)
    for seq, seq_len in enumerate(seq_lens.tolist()):
        blocks = block_tables[seq, : -(-seq_len // block_size)].long()

        def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [num_kv_heads, seq_len, head_dim]
            return cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)

        out[seq] = torch.nn.functional.scaled_dot_product_attention(
            query[seq, :, None], contiguous(key_cache), contiguous(value_cache))[:, 0]
    return out


def median_seconds(function, *args) -> float:
    function(*args)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def op_demo() -> bool:
    query, key_cache, value_cache, block_tables, seq_lens = llama_7b_decode_batch()
    max_seq_len = max(LLAMA_7B_DECODE_LENGTHS)

    def paged(*args):
        return paged_attn.paged_attention(*args, max_seq_len=max_seq_len)

    args = (query, key_cache, value_cache, block_tables, seq_lens)
    expected = reference.paged_attention(*args, scale=query.shape[-1] ** -0.5)
    error = (paged(*args).double() - expected).abs().max().item()
    baseline_error = (gather_then_sdpa(*args).double() - expected).abs().max().item()
    relative = error / expected.abs().max().item()
    paged_time, baseline_time = median_seconds(paged, *args), median_seconds(gather_then_sdpa, *args)

    kv_mib = sum(LLAMA_7B_DECODE_LENGTHS) * 2 * 32 * 128 * 4 / 2**20
    print("== op: paged_attention on the CPU, Llama-2-7B decode shape (32 q heads, 32 KV heads, "
          "head 128, block 16, fp32)")
    print(f"   {len(LLAMA_7B_DECODE_LENGTHS)} sequences of {list(LLAMA_7B_DECODE_LENGTHS)} tokens "
          f"({kv_mib:.0f} MiB of K/V), torch threads: {torch.get_num_threads()}")
    print(f"   max |error| vs float64 reference: paged_attention {error:.2e} "
          f"(relative {relative:.1e}), gather-then-SDPA {baseline_error:.2e}")
    print(f"   median of {REPEATS}: paged_attention {paged_time * 1e3:7.2f} ms   "
          f"gather-then-SDPA {baseline_time * 1e3:7.2f} ms   "
          f"speed-up x{baseline_time / paged_time:.2f}")
    return relative <= 1e-5


def main() -> int:
    tokens_ok = transformers_demo()
    print()
    op_ok = op_demo()
    return 0 if tokens_ok and op_ok else 1


if __name__ == "__main__":
    sys.exit(main())
