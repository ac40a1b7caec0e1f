"""Tests of the SIMT emulator (csrc/sim/) that runs our CUDA kernels on the CPU.

The kernels of csrc/sim/tests/simt_test_kernels.cuh are built with g++ into a standalone driver
(csrc/sim/tests/simt_selftest.cpp) in three variants: the x86-64 assembly fibers, the forced
ucontext fallback, and ASan+UBSan. Each test runs one driver case in a subprocess (so a sanitizer
abort cannot take pytest down) and checks the JSON it prints against expectations computed here
from CUDA's documented semantics. The same kernels are also compiled by nvcc, which proves they
stay valid CUDA. Builds are cached under build/simt_selftest/, keyed by the sources and flags.
"""

import concurrent.futures
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
SIM_DIR = REPO / "csrc" / "sim"
KERNELS = SIM_DIR / "tests" / "simt_test_kernels.cuh"
DRIVER = SIM_DIR / "tests" / "simt_selftest.cpp"
NVCC_CHECK = SIM_DIR / "tests" / "simt_nvcc_check.cu"
BUILD_ROOT = REPO / "build" / "simt_selftest"

spec = importlib.util.spec_from_file_location("simt_build", SIM_DIR / "simt_build.py")
simt_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simt_build)

# The fallback is built at -O1 to save build time; its speed is dominated by swapcontext.
VARIANTS = {
    "fiber": dict(sanitize=False, force_ucontext=False),
    "ucontext": dict(sanitize=False, force_ucontext=True, optimize="-O1"),
    "sanitized": dict(sanitize=True, force_ucontext=False),
}
ORDERS = ["forward", "reverse", "random"]
NVCC_ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


# ---- Building and running the driver ----------------------------------------------------------

def nvcc_path():
    found = shutil.which("nvcc")
    return found or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")


def build_directory():
    """A directory named by a hash of every emulator source, the build settings and the
    toolchain versions, so a cached build is never stale."""
    digest = hashlib.sha256()
    sources = sorted(SIM_DIR.glob("simt*")) + sorted((SIM_DIR / "tests").glob("simt*"))
    for path in sources + [REPO / "csrc" / "kernels" / "kcompat.cuh"]:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    for tool in ("g++", nvcc_path()):
        digest.update(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
                      .encode())
    digest.update(repr((VARIANTS, NVCC_ARCHS)).encode())
    return BUILD_ROOT / digest.hexdigest()[:16]


def remove_stale_builds(keep, max_age_seconds=3600):
    """Builds of older sources pile up while the emulator is edited; drop those untouched for an
    hour (a concurrent session may still be using a recent one)."""
    for directory in BUILD_ROOT.iterdir():
        if directory != keep and time.time() - directory.stat().st_mtime > max_age_seconds:
            shutil.rmtree(directory, ignore_errors=True)


def build_cached(command, output):
    """Run `command` to produce `output` unless it exists; a failure shows the compiler output."""
    if output.exists():
        return output
    partial = output.with_name(output.name + ".partial")
    command = [str(partial) if part == str(output) else part for part in command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"build failed: {' '.join(command)}\n{result.stdout}{result.stderr}")
    partial.rename(output)
    return output


def build_driver(directory, variant):
    output = directory / f"simt_selftest_{variant}"
    command = simt_build.compile_command(str(DRIVER.relative_to(REPO)), str(output),
                                         **VARIANTS[variant])
    return build_cached(command, output)


def build_with_nvcc(directory):
    output = directory / "simt_nvcc_check.o"
    command = [nvcc_path(), "-std=c++20", "-c", f"-I{REPO / 'csrc'}", *NVCC_ARCHS,
               str(NVCC_CHECK), "-o", str(output)]
    return build_cached(command, output)


class Builds:
    """The driver variants and the nvcc compile, started concurrently. `builds[name]` waits for
    one and raises its build error, so a broken variant fails only the tests that use it."""

    def __init__(self, directory):
        jobs = {variant: (build_driver, directory, variant) for variant in VARIANTS}
        jobs["nvcc"] = (build_with_nvcc, directory)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        self.futures = {name: self.pool.submit(*job) for name, job in jobs.items()}

    def __getitem__(self, name):
        return self.futures[name].result()


@pytest.fixture(scope="session")
def builds():
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(keep=directory)
    started = Builds(directory)
    yield started
    started.pool.shutdown(wait=True)


def clean_environment(order, seed):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SIMT_")}
    env["SIMT_ORDER"] = order
    if seed is not None:
        env["SIMT_SEED"] = str(seed)
    return env


def run_case(builds, case, variant="fiber", order="forward", seed=None):
    """Run one driver case; returns its JSON report (`ok` plus `outputs` or `error`)."""
    result = subprocess.run([str(builds[variant]), case], capture_output=True, text=True,
                            env=clean_environment(order, seed), timeout=120)
    assert result.returncode == 0, f"{case} crashed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def outputs_of(builds, case, **kwargs):
    report = run_case(builds, case, **kwargs)
    assert report["ok"], report["error"]
    return {name: np.array(values) for name, values in report["outputs"].items()}


def error_of(builds, case, **kwargs):
    report = run_case(builds, case, **kwargs)
    assert not report["ok"], f"{case} was expected to fail but returned {report['outputs']}"
    return report["error"]


def planted(name):
    """`file:line` of the kernel line marked PLANTED(name)."""
    for number, line in enumerate(KERNELS.read_text().splitlines(), start=1):
        if f"PLANTED({name})" in line:
            return f"simt_test_kernels.cuh:{number}"
    raise LookupError(name)


# ---- Expected values ----------------------------------------------------------------------------

def ramp(count):
    """The driver's inputs: small multiples of 1/4, so every sum is exact in float32."""
    i = np.arange(count)
    return (i % 7 + 0.25 * (i % 3)).astype(np.float32)


def block_sums(blocks, threads):
    return ramp(blocks * threads).reshape(blocks, threads).sum(axis=1, dtype=np.float64)


def lane_value(warp, lane):
    return 100.0 * warp + lane + 0.5


def shuffle_source(mode, lane, arg, width=32):
    """The source lane of a shuffle as the CUDA Programming Guide defines it, or None for "keep
    your own value". The warp is split into groups of `width` lanes."""
    group = lane // width * width
    if mode == "idx":
        return group + arg % width
    if mode == "up":
        return lane - arg if lane % width >= arg else None
    if mode == "down":
        return lane + arg if lane % width + arg < width else None
    source = lane ^ arg  # xor: a later group's lane means "keep your own value"
    return source if source < group + width else None


def shuffled(mode, lane, arg, width=32, value=lambda source: source):
    source = shuffle_source(mode, lane, arg, width)
    return value(lane if source is None else source)


def to_bfloat16(x):
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


def expected_warp_rows():
    """What each of the 64 threads of warp_semantics stores for each of its 20 cases."""
    rows = np.zeros((20, 64))
    for thread in range(64):
        warp, lane = divmod(thread, 32)
        value = lambda source: lane_value(warp, source)  # noqa: E731
        column = rows[:, thread]
        column[0] = shuffled("idx", lane, lane * 7 % 32, value=value)
        column[1] = shuffled("idx", lane, 11, 8, value=value)
        column[2] = shuffled("idx", lane, -3, 16, value=value)
        column[3] = shuffled("up", lane, 3, 8, value=value)
        column[4] = shuffled("down", lane, 3, 16, value=value)
        column[5] = shuffled("xor", lane, 5, 8, value=value)
        column[6] = shuffled("xor", lane, 19, value=value)
        if lane < 16:  # lanes 12..15 read lanes 16..19, outside the exchange: poison
            source = shuffle_source("down", lane, 4)
            column[7] = value(source) if source < 16 else np.nan
        else:
            column[7] = shuffled("xor", lane, 1, value=value)
        same_parity = [other for other in range(32) if other % 2 == lane % 2]
        column[8] = sum(1 << other for other in same_parity if other % 3 == 0)
        column[9] = int(7 in same_parity)
        column[10] = int(all(other < 31 for other in same_parity))
        column[11] = sum(1 << other for other in range(21, 32)) if warp == 1 else 0
        column[12] = shuffled("xor", lane, 3, value=lambda source: -1000 * source)
        column[13] = shuffled("idx", lane, (lane + 1) % 32, value=lambda source: source << 40)
        column[14] = shuffled("down", lane, 1, value=lambda source: 1.0 / (source + 1))
        column[15] = float(np.float16(shuffled("xor", lane, 2, value=value)))
        column[16] = -999.0 * shuffled("idx", lane, 31 - lane, value=value)
        column[17] = to_bfloat16(shuffled("up", lane, 1, value=value))
        column[18] = to_bfloat16(lane_value(warp, 0)) + 1000.0 * to_bfloat16(
            2 * lane_value(warp, 0))
        column[19] = shuffled("xor", lane, 31, value=lambda source: source * source)
    return rows


def sync_heavy_model(blocks, threads):
    """sync_heavy in numpy float32: per round, add the xor partner, then average with the
    right-hand neighbour (cyclically)."""
    v = np.arange(threads, dtype=np.float32)
    neighbour = (np.arange(threads) + 1) % threads
    for round_index in range(10):
        v = v + v[np.arange(threads) ^ (1 + round_index % 16)]
        v = np.float32(0.5) * (v + v[neighbour])
    return np.tile(v, blocks)


# ---- Barriers and shared memory -----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fiber", "ucontext"])
@pytest.mark.parametrize("order", ORDERS)
def test_correct_reductions_agree_in_every_order(builds, variant, order):
    tree = outputs_of(builds, "block_sum_tree", variant=variant, order=order, seed=7)
    np.testing.assert_array_equal(tree["sums"], block_sums(4, 64))
    warps = outputs_of(builds, "block_sum_warps_1024", variant=variant, order=order, seed=7)
    np.testing.assert_array_equal(warps["sums"], block_sums(2, 1024))


def test_missing_barrier_changes_the_result(builds):
    forward = outputs_of(builds, "block_sum_missing_barrier", order="forward")["sums"]
    reverse = outputs_of(builds, "block_sum_missing_barrier", order="reverse")["sums"]
    # Forward order runs thread 0 first, so it adds cells nobody has written yet (NaN); reverse
    # order happens to hide the bug. The correct kernel gives the same sums in both orders.
    assert np.isnan(forward).all()
    np.testing.assert_array_equal(reverse, block_sums(4, 64))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_shared_memory_is_poisoned_and_fresh_for_every_block(builds, order):
    seen = outputs_of(builds, "read_before_write", order=order)
    # Each block reads before writing: it must see NaN, never the previous block's value.
    assert np.isnan(seen["static"]).all() and len(seen["static"]) == 3
    assert np.isnan(seen["dynamic"]).all() and len(seen["dynamic"]) == 3


def test_barrier_reductions(builds):
    votes = outputs_of(builds, "barrier_votes", order="random", seed=3)["votes"]
    threads = np.arange(100)
    assert votes.tolist() == [np.sum(threads % 3 == 0), 1, 1, 0]


def test_order_variable_permutes_threads_and_blocks(builds):
    def order(**kwargs):
        return outputs_of(builds, "arrival_order", **kwargs)["order"].tolist()

    everyone = list(range(32))  # 4 blocks of 8 threads
    assert order(order="forward") == everyone
    assert order(order="reverse") == everyone[::-1]
    first = order(order="random", seed=1)
    again = order(order="random", seed=1)
    other = order(order="random", seed=2)
    assert sorted(first) == everyone and sorted(other) == everyone
    assert first == again, "the same seed must reproduce the same schedule"
    assert first != other and first not in (everyone, everyone[::-1])
    error = error_of(builds, "arrival_order", order="backwards")
    assert "SIMT_ORDER=backwards is not one of forward, reverse, random" in error


# ---- Warp intrinsics ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant, order", [("fiber", "forward"), ("fiber", "random"),
                                            ("ucontext", "reverse"), ("sanitized", "random")])
def test_shuffles_and_votes_follow_cuda_semantics(builds, variant, order):
    rows = outputs_of(builds, "warp_semantics", variant=variant, order=order, seed=11)["rows"]
    np.testing.assert_array_equal(rows.reshape(20, 64), expected_warp_rows())


def test_missing_lanes_of_a_partial_warp_count_as_exited(builds):
    masks = outputs_of(builds, "partial_warp")["masks"]
    # 48 threads: warp 0 is full, warp 1 has lanes 0..15 only.
    assert masks.tolist() == [0xFFFFFFFF, 0xFFFFFFFF, 0x0000FFFF, 0x0000FFFF]


def test_threads_of_a_3d_block_are_numbered_x_fastest(builds):
    pairs = outputs_of(builds, "thread_numbering")["pairs"].reshape(-1, 2)
    linear = np.arange(5 * 3 * 3)
    np.testing.assert_array_equal(pairs[:, 0], linear)
    np.testing.assert_array_equal(pairs[:, 1], linear // 32 * 32)


# ---- Launches, atomics, intrinsics --------------------------------------------------------------

def test_template_and_parameterless_kernels_launch(builds):
    outputs = outputs_of(builds, "launch_plumbing")
    np.testing.assert_array_equal(outputs["scaled"], 3.0 * np.arange(64))
    assert outputs["counted"].tolist() == [2 * 3 * 4 * 2]


def test_atomics_and_device_math(builds):
    outputs = outputs_of(builds, "atomics_and_math", order="random", seed=5)
    assert outputs["sum"].tolist() == [256 * 0.25]
    assert outputs["maximum"].tolist() == [max(t * 37 % 101 for t in range(256))]
    math = outputs["math"]
    assert math[:4].tolist() == [1.5 * 2.0 + 0.25, -2.0 * 3.0 + 0.5, 8.0, 6.0]
    np.testing.assert_allclose(math[4:8], [np.e, 0.25, 0.125, 8.0], rtol=1e-6)
    inputs = torch.tensor([1000.0, -1000.0, 0.3, -0.0137])
    fp8 = inputs.to(torch.float8_e4m3fn)  # saturating, like __NV_SATFINITE
    assert outputs["fp8"].tolist() == fp8.view(torch.uint8).tolist()
    assert math[8:].tolist() == fp8.float().tolist()


def test_dynamic_shared_memory_above_48k_needs_an_opt_in(builds):
    error = error_of(builds, "dynamic_shared_without_opt_in")
    assert "65536 bytes of dynamic shared memory" in error and "kset_max_dynamic_smem" in error
    out = outputs_of(builds, "dynamic_shared_with_opt_in")["out"]
    np.testing.assert_array_equal(out, np.tile(np.arange(128)[::-1], 2))


def test_invalid_launches_are_rejected(builds):
    assert "block (2048,1,1) is not a valid block shape" in error_of(builds, "invalid_block")
    error = error_of(builds, "too_much_shared")
    assert "52000 bytes" in error and "too_much_shared" in error
    assert "__syncthreads called at" in error_of(builds, "outside_kernel")
    assert "outside a kernel launch" in error_of(builds, "outside_kernel")


# ---- Reported kernel bugs -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_lane_outside_its_mask_is_reported(builds, variant, order):
    error = error_of(builds, "lane_outside_mask", variant=variant, order=order)
    assert "kernel 'simt_tests::lane_outside_mask(float*)'" in error
    assert "block (1,0,0), thread (5,0,0) [warp 0 lane 5]" in error
    assert f"__shfl_sync at csrc/sim/tests/{planted('lane-outside-mask')}" in error
    assert "mask 0xffffffdf, which does not include the calling lane 5" in error


def test_threads_waiting_at_different_barriers_are_reported(builds):
    error = error_of(builds, "divergent_barrier")
    assert "divergent barrier" in error and "block (0,0,0), thread (32,0,0)" in error
    assert planted("divergent-barrier-a") in error and planted("divergent-barrier-b") in error


@pytest.mark.parametrize("order, culprit", [("forward", "thread (40,0,0)"),
                                            ("reverse", "thread (39,0,0)")])
def test_exit_while_others_wait_at_a_barrier_is_reported(builds, order, culprit):
    # Forward: thread 40 exits while 0..39 wait. Reverse: thread 39 arrives after 63..40 exited.
    error = error_of(builds, "early_exit", order=order)
    assert "divergent barrier" in error and culprit in error
    assert planted("early-exit") in error


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deadlock_is_reported_with_every_waiting_group(builds, variant):
    error = error_of(builds, "deadlock", variant=variant)
    assert "deadlock in kernel 'simt_tests::warp_block_deadlock(float*)'" in error
    assert ("thread (0,0,0) [warp 0 lane 0] .. thread (15,0,0) [warp 0 lane 15] waits in "
            f"__syncwarp(mask=0xffffffff) at csrc/sim/tests/{planted('deadlock-warp')}") in error
    blocker = f"__syncthreads at csrc/sim/tests/{planted('deadlock-block')}"
    assert f"lane 16 of its mask waits at {blocker}" in error


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_lanes_disagreeing_on_the_mask_are_reported(builds, order):
    error = error_of(builds, "disagreeing_masks", order=order)
    assert "warp lanes disagree" in error and planted("disagreeing-masks") in error
    assert "__shfl_sync(mask=0x00000003" in error and "__shfl_sync(mask=0x00000007" in error


@pytest.mark.parametrize("variant", ["fiber", "sanitized"])
def test_failed_kassert_is_reported(builds, variant):
    error = error_of(builds, "kassert", variant=variant, order="reverse")
    assert "block (2,0,0), thread (7,0,0)" in error
    assert f"KASSERT(x >= 0.0f) failed at csrc/sim/tests/{planted('kassert')}" in error


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exception_escaping_a_kernel_is_reported(builds, variant):
    error = error_of(builds, "kernel_throws", variant=variant)
    assert "block (1,0,0), thread (3,0,0)" in error
    assert "the kernel threw: checked_sqrt of a negative number" in error


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_emulator_recovers_after_a_failed_launch(builds, variant):
    outputs = outputs_of(builds, "recover_after_error", variant=variant)
    assert outputs["first_failed"].tolist() == [1]
    np.testing.assert_array_equal(outputs["sums"], block_sums(4, 64))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_launches_on_two_os_threads_do_not_interfere(builds, variant):
    outputs = outputs_of(builds, "two_threads", variant=variant, order="random", seed=9)
    expected = np.tile(block_sums(2, 256), 25)
    np.testing.assert_array_equal(outputs["first"], expected)
    np.testing.assert_array_equal(outputs["second"], expected)


# ---- Sanitizer build ----------------------------------------------------------------------------

def sanitizer_abort(builds, case):
    result = subprocess.run([str(builds["sanitized"]), case], capture_output=True, text=True,
                            env=clean_environment("forward", None), timeout=120)
    assert result.returncode != 0, f"{case} was expected to abort:\n{result.stdout}"
    return result.stderr


def test_asan_catches_an_out_of_bounds_global_read(builds):
    report = sanitizer_abort(builds, "out_of_bounds_read")
    assert "AddressSanitizer: heap-buffer-overflow" in report
    kernel = "simt_tests::out_of_bounds_read(float const*, float*, int)"
    assert f"in {kernel} csrc/sim/tests/{planted('oob-read')}" in report
    assert f"simt: the sanitizer error above happened in kernel '{kernel}'" in report
    assert "block (1,0,0), thread (31,0,0)" in report


def test_asan_catches_a_read_past_a_shared_array(builds):
    report = sanitizer_abort(builds, "shared_out_of_bounds")
    assert "AddressSanitizer: use-after-poison" in report
    assert planted("shared-oob") in report and "block (0,0,0), thread (31,0,0)" in report


def test_ubsan_catches_signed_overflow_in_a_kernel(builds):
    report = sanitizer_abort(builds, "signed_overflow")
    assert f"{planted('signed-overflow')}:" in report and "signed integer overflow" in report
    assert "block (0,0,0), thread (9,0,0)" in report


# ---- Fibers, speed, nvcc ----------------------------------------------------------------------

def test_each_build_uses_the_requested_fibers(builds):
    assert run_case(builds, "partial_warp", variant="fiber")["backend"] == "x86_64-asm"
    assert run_case(builds, "partial_warp", variant="ucontext")["backend"] == "ucontext"
    assert run_case(builds, "partial_warp", variant="sanitized")["backend"] == "x86_64-asm"


def test_benchmark_is_correct_and_assembly_fibers_beat_ucontext(builds):
    fast = outputs_of(builds, "benchmark", variant="fiber")
    slow = outputs_of(builds, "benchmark", variant="ucontext", order="reverse")
    np.testing.assert_array_equal(fast["out"], sync_heavy_model(64, 128))
    np.testing.assert_array_equal(slow["out"], sync_heavy_model(64, 128))
    print(f"\n64x128 threads, 10 barriers + 10 shuffles each: {fast['median_ms'][0]:.1f} ms CPU "
          f"(ucontext {slow['median_ms'][0]:.1f} ms); switch {fast['switch_ns'][0]:.1f} ns "
          f"(ucontext {slow['switch_ns'][0]:.1f} ns)")
    # Both costs are thread CPU time, so machine load does not change their ratio much.
    assert fast["switch_ns"][0] * 2 < slow["switch_ns"][0]
    assert fast["median_ms"][0] < 1000


def test_kernels_and_launchers_compile_with_nvcc(builds):
    # The fixture has already compiled simt_nvcc_check.cu for sm_80 and sm_90.
    assert builds["nvcc"].stat().st_size > 0
