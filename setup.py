"""Build script for paged_attn.

Builds `paged_attn._C`, the library of ops: C++ CPU kernels always, plus the CUDA kernels in
csrc/cuda/ when nvcc and a CUDA build of torch are both present (otherwise a CPU-only
CppExtension). With PAGED_ATTN_BUILD_SIM=1 it also builds `paged_attn._sim`, the test-only
extension that runs the same CUDA kernel sources on the CPU through our SIMT emulator.

Environment:
  PAGED_ATTN_CPU_ONLY=1     skip CUDA even when it is available
  PAGED_ATTN_BUILD_SIM=1    build the emulator extension (make test sets it)
  PAGED_ATTN_NO_EXT=1       install the Python package only (make builds extensions in place)
  TORCH_CUDA_ARCH_LIST      defaults to "8.0;9.0"
  MAX_JOBS                  parallel compile jobs (default 2)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when it is imported; /usr/local/bin/nvcc is a wrapper,
# so without this the toolkit's include and library paths are not found.
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")

from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(CSRC, pattern)))
    return [os.path.relpath(path, ROOT) for path in found]


def cuda_available():
    if os.environ.get("PAGED_ATTN_CPU_ONLY") == "1":
        return False
    import torch

    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    return has_nvcc and torch.version.cuda is not None and bool(sources("cuda/*.cu"))


def cuda_include_dirs():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return [os.path.join(home, "include")]


CXX_FLAGS = ["-O3", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# at::parallel_for runs on torch's OpenMP threads only in code compiled with -fopenmp; without it
# the CPU kernels silently use one core. At run time libgomp.so.1 is the copy torch has loaded.
OPENMP_FLAGS = ["-fopenmp"]
COMMON_SOURCES = ["torch_bindings.cpp", "core/*.cpp"]


def library_extension():
    if cuda_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return cpp_extension.CUDAExtension(
            "paged_attn._C",
            sources(*COMMON_SOURCES, "cpu/*.cpp", "cuda/*.cu", "cuda/*.cpp"),
            include_dirs=[CSRC],
            define_macros=[("PAGED_ATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    return cpp_extension.CppExtension(
        "paged_attn._C",
        sources(*COMMON_SOURCES, "cpu/*.cpp"),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )


def sim_extension():
    return cpp_extension.CppExtension(
        "paged_attn._sim",
        sources("core/*.cpp", "sim/*.cpp"),
        include_dirs=[CSRC] + cuda_include_dirs(),
        define_macros=[("PAGED_ATTN_SIM", "1")],
        # CUDA's `#pragma unroll` means nothing to g++.
        extra_compile_args={"cxx": CXX_FLAGS + ["-Wno-unknown-pragmas"]},
    )


extensions = [library_extension()]
if os.environ.get("PAGED_ATTN_BUILD_SIM") == "1":
    extensions.append(sim_extension())
if os.environ.get("PAGED_ATTN_NO_EXT") == "1":
    # `make build` installs the package this way, then runs `setup.py build_ext --inplace`,
    # whose fixed build directory lets ninja reuse every unchanged object on the next build.
    extensions = []

os.environ.setdefault("MAX_JOBS", "2")

setup(
    name="paged_attn",
    version="0.1.0",
    description="Paged KV-cache attention kernels (CPU and CUDA) for LLM serving with PyTorch",
    license="Apache-2.0",
    packages=find_packages(include=["paged_attn", "paged_attn.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"hf": ["transformers==5.23.0"]},
    ext_modules=extensions,
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
