"""Shared pieces of the CPU benchmarks: the machine's description, a read-bandwidth probe, timing
and the generated performance section bench/README_perf.md.

Imports only torch and the standard library (matplotlib lazily), so the vLLM worker that
bench_decode.py starts in another Python environment can import it too.
"""

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PERF_README = BENCH_DIR / "README_perf.md"
GiB = 2 ** 30

# CPU flags that decide which kernels can run (ours and the baselines').
INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16")


def machine() -> dict:
    """What the numbers were measured on: CPU model and flags, cores, memory, software."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                    if line.startswith("MemTotal")), 0)
    return {
        "cpu": fields.get("model name", platform.processor() or "unknown"),
        "cpu_id": (f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
                   f"stepping {fields.get('stepping', '?')}"),
        "caches": _cache_sizes(),
        "flags": [flag for flag in INTERESTING_FLAGS if flag in flags],
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_kib / 2 ** 20, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu_isa_override": os.environ.get("PAGED_ATTN_CPU_ISA", "auto"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _cache_sizes() -> str:
    """L1d/L2/L3 sizes as the kernel reports them for CPU 0."""
    sizes = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
        if kind != "Instruction":
            sizes.append(f"L{level} {(index / 'size').read_text().strip()}")
    return ", ".join(sizes)


class BandwidthProbe:
    """The machine's read bandwidth, measured in the same run as the kernels.

    A streaming read of `gib` GiB of float32 (torch.sum, on torch's threads) is far larger than
    any cache, so its speed is the DRAM read bandwidth. Samples are taken between kernel runs;
    the best one is the run's bandwidth (the noise on a shared machine only ever slows it).
    """

    def __init__(self, gib: float = 1.0, device: str = "cpu"):
        self.buffer = torch.ones(int(gib * GiB) // 4, device=device)
        self.device = device
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> float:
        """Takes `repeats` samples and returns their best, in GB/s."""
        taken = []
        for _ in range(repeats):
            seconds = time_call(lambda: self.buffer.sum(), self.device)
            taken.append(self.buffer.numel() * 4 / seconds / 1e9)
        self.samples += taken
        return max(taken)

    @property
    def best(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def summary(self) -> dict:
        return {"best_gbps": self.best, "median_gbps": statistics.median(self.samples),
                "samples": len(self.samples), "probe": f"torch.sum over {self.buffer.numel() * 4 / GiB:.0f} "
                f"GiB float32, {torch.get_num_threads()} threads"}


def time_call(fn, device: str = "cpu") -> float:
    """Wall time of one call in seconds (CUDA events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def load_json(name: str) -> dict | None:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list]) -> str:
    """A fixed-width table for the terminal."""
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_perf_readme() -> Path:
    """Writes bench/README_perf.md from the latest decode_cpu.json and cache_ops.json.

    Every figure in it comes from those files; the sections are rendered by the scripts that
    own them (bench_decode.decode_section, bench_cache_ops.cache_section).
    """
    import bench_cache_ops
    import bench_decode

    decode, cache = load_json("decode_cpu.json"), load_json("cache_ops.json")
    info = (decode or cache or {}).get("machine", machine())
    parts = [
        "## Performance (CPU)",
        "",
        "Generated by `python bench/bench_decode.py` and `python bench/bench_cache_ops.py`; "
        "do not edit by hand. Every number below was measured in the run that wrote "
        "`bench/results/*.json`, with caches rotated so that no kernel reads data it read "
        "before. No GPU timing has been taken on this machine.",
        "",
        "### Machine",
        "",
        markdown_table(["", ""], [
            ["CPU", f"{info['cpu']} ({info.get('cpu_id', '')}; {info.get('caches', '')} per core/socket)"],
            ["flags", " ".join(info["flags"])],
            ["cores / torch threads", f"{info['logical_cores']} / {info['torch_threads']}"],
            ["memory", f"{info['memory_gib']} GiB"],
            ["software", f"torch {info['torch']}, Python {info['python']}, Linux {info['kernel']}"],
        ]),
        "",
    ]
    parts += bench_decode.decode_section(decode) if decode else ["(decode: not run yet)", ""]
    parts += bench_cache_ops.cache_section(cache) if cache else ["(cache ops: not run yet)", ""]
    PERF_README.write_text("\n".join(parts))
    return PERF_README
