"""The CUDA kernels on the CPU, through the SIMT emulator (tests only).

`import paged_attn.sim` loads the `paged_attn._sim` extension, so that
`torch.ops.paged_attn_sim.<op>` exist with exactly the schemas of `torch.ops.paged_attn` and run
the csrc/cuda launchers and kernels on CPU tensors. setup.py builds it with
PAGED_ATTN_BUILD_SIM=1.

With PAGED_ATTN_SIM_ASAN=1 the module instead builds the same sources with AddressSanitizer and
UndefinedBehaviorSanitizer into build/sim-asan/ (once; ninja rebuilds only what changed) and loads
that. The ASan runtime must be loaded first:

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        PAGED_ATTN_SIM_ASAN=1 python -m pytest tests/test_sim_kernels.py -m asan_subset

`set_decode_config` sets the decode launch knobs (path, partition size, SM count), which on a
GPU come from the device; tests use it to force the one-pass or split-K path on short contexts.
"""

import contextlib
import glob
import importlib
import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASAN_ENV = "PAGED_ATTN_SIM_ASAN"

PATHS = {"auto": 0, "one_pass": 1, "split_k": 2}
DEFAULT_PARTITION_SIZE = 512


def _build_sanitized():
    """JIT-builds the emulator extension with ASan + UBSan into build/sim-asan/ and imports it.

    The sanitizer flags are the emulator's (csrc/sim/simt_build.py); the sources are setup.py's.
    """
    spec = importlib.util.spec_from_file_location(
        "simt_build", os.path.join(ROOT, "csrc", "sim", "simt_build.py"))
    simt_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simt_build)
    csrc = os.path.join(ROOT, "csrc")
    build_dir = os.path.join(ROOT, "build", "sim-asan")
    os.makedirs(build_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(csrc, "core", "*.cpp")) +
                     glob.glob(os.path.join(csrc, "sim", "*.cpp")))
    return simt_build.load_extension(
        "_sim", sources, sanitize=True, build_directory=build_dir,
        extra_cflags=["-DPAGED_ATTN_SIM=1"])


def _load():
    if os.environ.get(ASAN_ENV) == "1":
        return _build_sanitized()
    return importlib.import_module("paged_attn._sim")


_extension = _load()
OPS = torch.ops.paged_attn_sim
SANITIZED: bool = os.environ.get(ASAN_ENV) == "1"


def set_decode_config(path: str = "auto", partition_size: int = DEFAULT_PARTITION_SIZE,
                      num_sms: int = 0) -> None:
    """Sets how the emulated paged_attention launches from now on.

    path: "auto" (split-K when one block per (sequence, KV head) would leave SMs idle and the
    context spans several partitions), "one_pass" or "split_k". partition_size: tokens per
    split-K partition. num_sms: the SM count "auto" compares against (0: the emulator's 108).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
    _extension.set_decode_config(PATHS[path], int(partition_size), int(num_sms))


@contextlib.contextmanager
def decode_config(path: str = "auto", partition_size: int = DEFAULT_PARTITION_SIZE,
                  num_sms: int = 0):
    """set_decode_config for the duration of a `with` block, then the defaults again."""
    set_decode_config(path, partition_size, num_sms)
    try:
        yield
    finally:
        set_decode_config()
