"""Every CUDA kernel instantiation compiles for sm_80 and sm_90 without register spills.

Runs bench/ptxas_report.py (nvcc -cubin -Xptxas -v; no GPU needed). nvcc exists on every
development machine and in CI, so a missing nvcc fails this test instead of skipping it.
"""

import collections
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC_SHARED_LIMIT = 48 * 1024
# Instantiations per arch: decode = 3 query dtypes x {same, fp8} caches x 7 head sizes.
EXPECTED_PER_ARCH = {
    "paged_decode_kernel": 42,
    "paged_decode_reduce_kernel": 3,
    "write_kv_kernel": 6,
    "copy_blocks_kernel": 1,
}


def load_report_module():
    spec = importlib.util.spec_from_file_location(
        "ptxas_report", os.path.join(ROOT, "bench", "ptxas_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernels():
    return load_report_module().report()


def kernel_family(name: str) -> str:
    return name.split("(")[0].split("<")[0].split("::")[-1]


def test_every_instantiation_is_reported(kernels):
    counts = collections.Counter((k.arch, kernel_family(k.kernel)) for k in kernels)
    for arch in ("80", "90"):
        for family, expected in EXPECTED_PER_ARCH.items():
            assert counts[(arch, family)] == expected, (arch, family, counts)


def test_no_kernel_spills(kernels):
    spilling = [(k.arch, k.kernel, k.spill_store_bytes, k.spill_load_bytes)
                for k in kernels if k.spills]
    assert not spilling, f"kernels that spill registers to local memory: {spilling}"


def test_static_shared_memory_fits_without_opt_in(kernels):
    too_big = [(k.arch, k.kernel, k.shared_bytes) for k in kernels
               if k.shared_bytes > STATIC_SHARED_LIMIT]
    assert not too_big, too_big
