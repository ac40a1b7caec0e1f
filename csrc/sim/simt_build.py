"""Compiler flags and build helpers for C++ that runs CUDA kernels on the SIMT emulator.

The emulator is header-only (csrc/sim/*.h, included through csrc/kernels/kcompat.cuh), so building
emulator-backed code only needs the right include paths and flags. This module is the one place
that knows them; setup.py, the Makefile and the tests use it. It imports nothing outside the
standard library at module level (torch is imported only by `load_extension`).

Two variants:
  plain       -O2, the x86-64 assembly fibers (ucontext elsewhere, or with force_ucontext).
  sanitized   AddressSanitizer + UndefinedBehaviorSanitizer, aborting on the first report. The
              emulator announces every fiber switch to ASan and poisons the gaps between shared
              memory buffers; a report is followed by the CUDA kernel, block and thread it came
              from.

A sanitized *Python extension* needs the ASan runtime loaded first, i.e. the test process must
run under `sanitizer_environment()`:
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python -m pytest ...
A standalone binary links the runtime itself and needs nothing.

Command line (for Makefiles):
    python csrc/sim/simt_build.py cxxflags [--sanitize] [--ucontext]
    python csrc/sim/simt_build.py ldflags [--sanitize]
    python csrc/sim/simt_build.py env            # shell assignments for a sanitized Python run
"""

import argparse
import os
import shlex
import subprocess
import sys

SIM_DIR = os.path.dirname(os.path.abspath(__file__))
CSRC_DIR = os.path.dirname(SIM_DIR)

# Kernels reinterpret memory as vector types (float4, __half2, ...), as CUDA code does, and use
# `#pragma unroll`, which GCC does not know (and cannot be told to ignore from a header).
COMMON_CXXFLAGS = ["-fno-strict-aliasing", "-Wno-unknown-pragmas"]

SANITIZER_CXXFLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
]
SANITIZER_LDFLAGS = ["-fsanitize=address,undefined"]

# Inside a torch extension, UBSan's vptr check compares type_info across libraries built without
# sanitizers and reports false positives.
EXTENSION_SANITIZER_CXXFLAGS = ["-fno-sanitize=vptr"]

# Forces the portable ucontext fibers on x86-64 (they are the default elsewhere).
UCONTEXT_DEFINE = "-DSIMT_FIBER_UCONTEXT=1"


def cuda_include_dir():
    """The CUDA headers (cuda_fp16.h & co.); no CUDA library is linked."""
    return os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


def include_dirs():
    """`csrc` (so code includes "kernels/kcompat.cuh") and the CUDA headers."""
    return [CSRC_DIR, cuda_include_dir()]


def cxx_flags(sanitize=False, force_ucontext=False, optimize="-O2"):
    """Compile flags for emulator-backed code, excluding include paths and -std."""
    flags = list(COMMON_CXXFLAGS)
    flags += SANITIZER_CXXFLAGS if sanitize else [optimize]
    if force_ucontext:
        flags.append(UCONTEXT_DEFINE)
    return flags


def ld_flags(sanitize=False):
    return list(SANITIZER_LDFLAGS) if sanitize else []


def compiler_runtime_library(name):
    """Full path of a GCC runtime library such as libasan.so, as `gcc -print-file-name` finds it."""
    path = subprocess.run(["gcc", f"-print-file-name={name}"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"gcc does not know where {name} is (got {path!r})")
    return path


def sanitizer_environment(base=None):
    """Environment for a Python process that imports a sanitized extension.

    ASan must be the first library loaded, hence LD_PRELOAD. Leak checking is off because the
    interpreter and torch keep allocations alive at exit. UBSan prints a stack trace per report.
    """
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = compiler_runtime_library("libasan.so")
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    return env


def load_extension(name, sources, sanitize=False, build_directory=None, extra_cflags=(),
                   extra_ldflags=(), **kwargs):
    """JIT-build a torch extension whose sources run CUDA kernels on the emulator.

    A thin wrapper over torch.utils.cpp_extension.load that adds the emulator's include paths and
    flags. A sanitized module can only be imported by a process started with
    `sanitizer_environment()`.
    """
    from torch.utils import cpp_extension

    cflags = cxx_flags(sanitize=sanitize) + list(extra_cflags)
    if sanitize:
        cflags += EXTENSION_SANITIZER_CXXFLAGS
    return cpp_extension.load(
        name=name,
        sources=list(sources),
        extra_include_paths=include_dirs(),
        extra_cflags=cflags,
        extra_ldflags=ld_flags(sanitize=sanitize) + list(extra_ldflags),
        build_directory=build_directory,
        **kwargs,
    )


def compile_command(source, output, sanitize=False, force_ucontext=False, optimize="-O2",
                    compiler="g++"):
    """The g++ command line that builds a standalone emulator program from one source file."""
    include_flags = [f"-I{path}" for path in include_dirs()]
    # -rdynamic exports the kernels' symbols, so reports can show their demangled names.
    return ([compiler, "-std=c++20", "-Wall", "-Wextra", "-Werror", "-rdynamic", "-pthread"] +
            cxx_flags(sanitize=sanitize, force_ucontext=force_ucontext, optimize=optimize) +
            include_flags + [source, "-o", output] + ld_flags(sanitize=sanitize))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["cxxflags", "ldflags", "env"])
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--ucontext", action="store_true", help="force the ucontext fibers")
    args = parser.parse_args(argv)
    if args.what == "cxxflags":
        flags = cxx_flags(sanitize=args.sanitize, force_ucontext=args.ucontext)
        print(shlex.join(flags + [f"-I{path}" for path in include_dirs()]))
    elif args.what == "ldflags":
        print(shlex.join(ld_flags(sanitize=args.sanitize)))
    else:
        env = sanitizer_environment(base={})
        print(" ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
