"""paged_attn: paged KV-cache attention for LLM serving with PyTorch.

Importing the package loads the compiled ops (`torch.ops.paged_attn.*`) and re-exports the
public API. The transformers integration (`PagedKVCache`, `paged_attn.hf`) and the engine are
loaded lazily, so `import paged_attn` never imports transformers.
"""

import importlib

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from paged_attn import _C
from paged_attn.allocator import (
    NO_BLOCK,
    AppendResult,
    BlockAllocator,
    BlockTable,
    OutOfBlocksError,
    PrefixCacheStats,
)
from paged_attn.ops import copy_blocks, paged_attention, swap_blocks, write_kv

__version__ = "0.1.0"

BUILT_WITH_CUDA: bool = bool(_C.built_with_cuda)

_LAZY = {"PagedKVCache": "paged_attn.kv_cache", "Engine": "paged_attn.engine"}

__all__ = [
    "BUILT_WITH_CUDA",
    "NO_BLOCK",
    "AppendResult",
    "BlockAllocator",
    "BlockTable",
    "Engine",
    "OutOfBlocksError",
    "PagedKVCache",
    "PrefixCacheStats",
    "copy_blocks",
    "paged_attention",
    "swap_blocks",
    "write_kv",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paged_attn' has no attribute {name!r}")
