"""Checks shared by the CUDA-kernel tests on the emulator (test_sim_kernels.py) and on a real GPU
(test_cuda_gpu.py).

Each check takes a raw op namespace (`torch.ops.paged_attn_sim` or `torch.ops.paged_attn`) and a
device, builds NaN-poisoned inputs with cases.py, runs the op and compares with
paged_attn/reference.py: decode with the dtype tolerance rule, the cache ops bit for bit.
"""

import random

import torch

from cases import FP8, empty_cache_pair, make_decode_case, pairwise
from paged_attn import reference

HEAD_SIZES = [64, 80, 96, 112, 128, 192, 256]
# (num_heads, num_kv_heads): GQA ratios 1, 4 and 8, and 12, which needs two blocks per KV head.
GQA = [(4, 4), (8, 2), (16, 2), (12, 1)]
FEATURES = {
    "plain": {},
    "alibi": {"alibi": True},
    "window": {"sliding_window": 24},
    "softcap": {"logits_soft_cap": 2.0},
    "all": {"alibi": True, "sliding_window": 40, "logits_soft_cap": 3.0},
}
SEQ_LENS = {
    "short": [0, 1, 37],
    "batch17": [0, 1] + random.Random(17).sample(range(2, 90), 15),
    "long": [130, 3],
}
DTYPES = {  # name: (query dtype, cache dtype)
    "f32": (torch.float32, torch.float32),
    "f16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f32-fp8": (torch.float32, FP8),
    "f16-fp8": (torch.float16, FP8),
    "bf16-fp8": (torch.bfloat16, FP8),
}
LAYOUTS = ["nhd", "hnd", "interleaved_kv", "padded_heads"]


def decode_grid(paths: list[str]) -> list[dict]:
    """Pairwise rows over every decode parameter (not the full cross product)."""
    return pairwise({
        "head_size": HEAD_SIZES,
        "block_size": [1, 16, 32, 64],
        "dtypes": list(DTYPES),
        "gqa": GQA,
        "feature": list(FEATURES),
        "seqs": list(SEQ_LENS),
        "layout": LAYOUTS,
        "path": paths,
    })


def decode_case(row: dict, device: str = "cpu"):
    dtype, kv_dtype = DTYPES[row["dtypes"]]
    num_heads, num_kv_heads = row["gqa"]
    return make_decode_case(
        seq_lens=SEQ_LENS[row["seqs"]], num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_size=row["head_size"], block_size=row["block_size"], dtype=dtype, kv_dtype=kv_dtype,
        layout=row["layout"], device=device, seed=row["head_size"] + row["block_size"],
        **FEATURES[row["feature"]])


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so NaN slots and fp8 values compare exactly."""
    return tensor.detach().cpu().contiguous().view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    differ = (bits(actual) != bits(expected)).sum().item()
    assert differ == 0, f"{what}: {differ} bytes differ from the reference"


def check_write_kv(ops, *, dtype, cache_dtype, layout, head_size, block_size=16,
                   num_kv_heads=2, device="cpu") -> None:
    """write_kv of 11 tokens (two skipped with -1) into a NaN-filled cache, bit for bit."""
    generator = torch.Generator().manual_seed(head_size)
    num_blocks, num_tokens = 5, 11
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=generator) * 4
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=generator) * 4
    k_scale = v_scale = None
    if cache_dtype == FP8:
        # Small scales push some values past fp8's 448: the kernel must saturate as torch does.
        k_scale = torch.tensor([0.02]).to(device)
        v_scale = torch.tensor([0.5]).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[[3, 7]] = -1
    key, value = key.to(dtype).to(device), value.to(dtype).to(device)
    slot_mapping = slots.to(device)
    key_cache, value_cache = empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size,
                                              cache_dtype, layout, device)
    expected_key, expected_value = reference.write_kv(
        key.cpu(), value.cpu(), key_cache.cpu(), value_cache.cpu(), slot_mapping.cpu(),
        None if k_scale is None else k_scale.cpu(), None if v_scale is None else v_scale.cpu())
    ops.write_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    assert_same_bits(key_cache, expected_key, "key_cache")
    assert_same_bits(value_cache, expected_value, "value_cache")


def filled_caches(num_layers, *, dtype, layout, head_size, num_blocks=6, block_size=16,
                  num_kv_heads=2, device="cpu"):
    """Per-layer key and value caches with distinct random contents (fp8 included)."""
    generator = torch.Generator().manual_seed(num_layers * 31 + head_size)
    key_caches, value_caches = [], []
    for _ in range(num_layers):
        for caches in (key_caches, value_caches):
            cache = empty_cache_pair(num_blocks, block_size, num_kv_heads, head_size, dtype,
                                     layout, device)[0]
            cache.copy_(torch.randn(cache.shape, generator=generator).to(dtype))
            caches.append(cache)
    return key_caches, value_caches


def check_copy_blocks(ops, *, num_layers, dtype, layout, head_size=64, device="cpu") -> None:
    key_caches, value_caches = filled_caches(num_layers, dtype=dtype, layout=layout,
                                             head_size=head_size, device=device)
    mapping = torch.tensor([[0, 3], [2, 5], [1, 4]], dtype=torch.int64)
    expected_keys, expected_values = reference.copy_blocks(
        [c.cpu() for c in key_caches], [c.cpu() for c in value_caches], mapping)
    ops.copy_blocks(key_caches, value_caches, mapping.to(device))
    for layer in range(num_layers):
        assert_same_bits(key_caches[layer], expected_keys[layer], f"key_caches[{layer}]")
        assert_same_bits(value_caches[layer], expected_values[layer], f"value_caches[{layer}]")


def check_swap_blocks(ops, *, dtype, src_layout, dst_layout, mapping, src_device="cpu",
                      dst_device="cpu") -> None:
    (src,), _ = filled_caches(1, dtype=dtype, layout=src_layout, head_size=80, device=src_device)
    dst = empty_cache_pair(8, 16, 2, 80, dtype, dst_layout, dst_device)[0]
    block_mapping = torch.tensor(mapping, dtype=torch.int64)
    expected = reference.swap_blocks(src.cpu(), dst.cpu(), block_mapping)
    ops.swap_blocks(src, dst, block_mapping)
    assert_same_bits(dst, expected, "dst")
