"""The CUDA ops on a real GPU (torch.ops.paged_attn on CUDA tensors) against the reference.

No GPU exists on the development machines or in CI, so every test that launches a kernel skips
without one; they run unchanged the day a GPU is there. The same kernels are executed on every
run through the emulator (test_sim_kernels.py). The registration test needs no GPU and never
skips.
"""

import pytest
import torch

import paged_attn
from cases import FP8, assert_matches_reference, case_id, make_decode_case
from kernel_checks import (
    check_copy_blocks,
    check_swap_blocks,
    check_write_kv,
    decode_case,
    decode_grid,
)
from paged_attn.ops import OP_NAMES

OPS = torch.ops.paged_attn
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_kernels_registered_iff_built_with_cuda():
    for name in OP_NAMES:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"paged_attn::{name}", "CUDA")
        assert registered == paged_attn.BUILT_WITH_CUDA, (name, registered)


@requires_gpu
@pytest.mark.parametrize("row", decode_grid(["auto"]), ids=case_id)
def test_paged_attention(row):
    case = decode_case(row, device="cuda")
    assert_matches_reference(case.run(OPS.paged_attention), case)


@requires_gpu
@pytest.mark.parametrize("seq_lens,dtype", [
    ([3000, 700, 1, 0], torch.float16),  # 4 seqs x 2 KV heads leave SMs idle: split-K
    ([1000] * 160, torch.bfloat16),      # 320 blocks fill the SMs: one pass
])
def test_paged_attention_long_contexts(seq_lens, dtype):
    case = make_decode_case(seq_lens=seq_lens, num_heads=16, num_kv_heads=2, head_size=128,
                            block_size=16, dtype=dtype, sliding_window=900, device="cuda")
    assert_matches_reference(case.run(OPS.paged_attention), case)


@requires_gpu
def test_decode_and_write_replay_in_a_cuda_graph():
    """The ops allocate split-K scratch from the caching allocator and never sync the host, so a
    CUDA graph captures them; replaying with new query values gives the new result."""
    case = make_decode_case(seq_lens=[1500, 20], num_heads=8, num_kv_heads=2, head_size=64,
                            block_size=16, dtype=torch.float16, device="cuda")
    new_key = torch.randn(2, 2, 64, device="cuda", dtype=torch.float16)
    slots = torch.tensor([-1, -1], device="cuda")  # skipped: keep the reference's cache intact
    out = torch.empty_like(case.query)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.write_kv(new_key, new_key, case.key_cache, case.value_cache, slots, None, None)
        OPS.paged_attention(*case.op_args(out))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS.write_kv(new_key, new_key, case.key_cache, case.value_cache, slots, None, None)
        OPS.paged_attention(*case.op_args(out))
    case.query.copy_(torch.randn_like(case.query))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, case)


@requires_gpu
@pytest.mark.parametrize("dtype,cache_dtype,layout,head_size", [
    (torch.float32, torch.float32, "nhd", 64),
    (torch.float16, FP8, "hnd", 128),
    (torch.bfloat16, FP8, "interleaved_kv", 80),
    (torch.bfloat16, torch.bfloat16, "padded_heads", 256),
])
def test_write_kv(dtype, cache_dtype, layout, head_size):
    check_write_kv(OPS, dtype=dtype, cache_dtype=cache_dtype, layout=layout, head_size=head_size,
                   device="cuda")


@requires_gpu
@pytest.mark.parametrize("num_layers,dtype,layout", [(3, torch.float16, "nhd"), (2, FP8, "hnd")])
def test_copy_blocks(num_layers, dtype, layout):
    check_copy_blocks(OPS, num_layers=num_layers, dtype=dtype, layout=layout, device="cuda")


@requires_gpu
@pytest.mark.parametrize("src_device,dst_device", [("cuda", "cpu"), ("cpu", "cuda"),
                                                   ("cuda", "cuda")])
def test_swap_blocks(src_device, dst_device):
    check_swap_blocks(OPS, dtype=torch.float16, src_layout="nhd", dst_layout="hnd",
                      mapping=[[0, 5], [1, 6], [4, 0]], src_device=src_device,
                      dst_device=dst_device)
    check_swap_blocks(OPS, dtype=torch.float16, src_layout="nhd", dst_layout="nhd",
                      mapping=[[0, 5], [1, 6], [4, 0]], src_device=src_device,
                      dst_device=dst_device)
