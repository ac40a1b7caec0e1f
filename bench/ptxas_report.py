"""Registers, shared memory and spills of every CUDA kernel instantiation, from ptxas.

Compiles the torch-free launcher sources (csrc/cuda/*.cu, which hold every kernel
instantiation) to cubins for each architecture with `-Xptxas -v` and parses what ptxas says per
entry function. No GPU is needed, only nvcc. tests/test_ptxas.py fails on any spill.

    python bench/ptxas_report.py [--arch 80 --arch 90] [--json out.json]
"""

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = ("80", "90")
# The flags torch's BuildExtension gives nvcc, plus setup.py's own.
NVCC_FLAGS = [
    "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)'")
PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
SPILLS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                    r"(?P<loads>\d+) bytes spill loads")
USAGE = re.compile(r"Used (?P<registers>\d+) registers(?:.*?, (?P<smem>\d+) bytes smem)?")


@dataclasses.dataclass
class KernelResources:
    arch: str
    source: str          # csrc/cuda/<file>.cu
    kernel: str          # demangled instantiation
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def nvcc_path() -> str:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("nvcc not found on PATH or in $CUDA_HOME/bin")


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                            check=True)
    return result.stdout.splitlines()


def parse_ptxas(output: str, source: str) -> list[KernelResources]:
    """KernelResources per entry function in ptxas -v output (one arch per output)."""
    kernels: list[KernelResources] = []
    described = None  # the function the following "bytes stack frame" line belongs to
    for line in output.splitlines():
        if match := ENTRY.search(line):
            kernels.append(KernelResources(arch=match["arch"], source=source,
                                           kernel=match["name"]))
        elif match := PROPERTIES.search(line):
            described = match["name"]
        elif kernels and described == kernels[-1].kernel and (match := SPILLS.search(line)):
            kernels[-1].stack_bytes = int(match["stack"])
            kernels[-1].spill_store_bytes = int(match["stores"])
            kernels[-1].spill_load_bytes = int(match["loads"])
        elif kernels and (match := USAGE.search(line)):
            kernels[-1].registers = int(match["registers"])
            kernels[-1].shared_bytes = int(match["smem"] or 0)
    for kernel, readable in zip(kernels, demangle([k.kernel for k in kernels])):
        kernel.kernel = readable
    return kernels


def compile_one(source: str, arch: str) -> list[KernelResources]:
    with tempfile.TemporaryDirectory() as scratch:
        command = [nvcc_path(), *NVCC_FLAGS, f"-I{CSRC}", "-cubin",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                   source, "-o", os.path.join(scratch, "kernels.cubin")]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for sm_{arch}:\n{result.stderr}")
    return parse_ptxas(result.stderr, os.path.relpath(source, ROOT))


def report(archs=DEFAULT_ARCHS, jobs: int = 2) -> list[KernelResources]:
    """Compiles every csrc/cuda/*.cu for every arch (in parallel) and collects the resources."""
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_one, source, arch) for arch in archs for source in sources]
        return [kernel for future in futures for kernel in future.result()]


def short_name(kernel: str) -> str:
    """`paged_attn::kernels::paged_decode_kernel<__half, __nv_fp8_e4m3, 128>(...)` -> without
    the namespace and the parameter list."""
    name = kernel.split("(")[0]
    return name.replace("paged_attn::kernels::", "")


def print_table(kernels: list[KernelResources]) -> None:
    header = f"{'arch':>5} {'regs':>4} {'smem B':>7} {'stack':>5} {'spill st/ld':>11}  kernel"
    print(header)
    print("-" * len(header))
    for k in sorted(kernels, key=lambda k: (k.arch, k.source, k.kernel)):
        spill = f"{k.spill_store_bytes}/{k.spill_load_bytes}"
        print(f"sm_{k.arch:<2} {k.registers:>4} {k.shared_bytes:>7} {k.stack_bytes:>5} "
              f"{spill:>11}  {short_name(k.kernel)}")
    spilling = [k for k in kernels if k.spills]
    print(f"\n{len(kernels)} instantiations; max {max(k.registers for k in kernels)} registers, "
          f"max {max(k.shared_bytes for k in kernels)} bytes static shared memory; "
          f"{len(spilling)} spill")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="e.g. 80 (repeatable; default 80 and 90)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    kernels = report(tuple(args.arch or DEFAULT_ARCHS), jobs=args.jobs)
    print_table(kernels)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([dataclasses.asdict(k) for k in kernels], out, indent=1)
    return 1 if any(k.spills for k in kernels) else 0


if __name__ == "__main__":
    raise SystemExit(main())
