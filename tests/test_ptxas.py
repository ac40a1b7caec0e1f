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


def test_parser_reads_spills_registers_and_shared_memory():
    """The spill check can fail: a ptxas report with spills is parsed as spilling."""
    output = """\
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_80'
ptxas info    : Function properties for _Z6kernelv
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 6976 bytes smem, 392 bytes cmem[0]
"""
    (kernel,) = load_report_module().parse_ptxas(output, "x.cu")
    assert (kernel.arch, kernel.kernel, kernel.registers, kernel.shared_bytes) == (
        "80", "kernel()", 255, 6976)
    assert (kernel.stack_bytes, kernel.spill_store_bytes, kernel.spill_load_bytes) == (16, 8, 12)
    assert kernel.spills
