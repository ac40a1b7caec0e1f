"""Runs the reduced memory simulation (bench/memory.py --quick) and checks its headline claims.

The claims are recomputed here from the raw rows the simulation reports, so a
bug in the script's own pass/fail bookkeeping cannot hide a failing number.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "memory.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    memory = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = memory  # dataclasses look their module up there
    spec.loader.exec_module(memory)
    out = tmp_path_factory.mktemp("memory")
    results = memory.main(
        ["--quick", "--results-dir", str(out), "--readme", str(out / "README_memory.md")]
    )
    return memory, results, out


def row(results, trace, policy):
    (found,) = [
        r
        for r in results["serving"]
        if (r["model"], r["trace"], r["policy"]) == ("Llama-2-7B", trace, policy)
    ]
    return found


def test_paged_waste_is_small_where_max_length_reservation_wastes_most(quick_run):
    memory, results, _ = quick_run
    scenario = memory.SEED_SCENARIO.name
    assert row(results, scenario, "paged-16")["waste_pct"] <= 4.0
    assert row(results, scenario, "max-length")["waste_pct"] >= 60.0


def test_paged_admits_more_sequences_on_the_sharegpt_like_trace(quick_run):
    memory, results, _ = quick_run
    trace = memory.SHAREGPT.name
    paged = row(results, trace, "paged-16")["mean_concurrency"]
    assert paged >= 2.5 * row(results, trace, "max-length")["mean_concurrency"]
    assert paged >= 1.3 * row(results, trace, "oracle")["mean_concurrency"]


def test_sharing_saves_memory_in_every_scenario(quick_run):
    _, results, _ = quick_run
    assert len(results["sharing"]) == 6
    for scenario in results["sharing"]:
        assert 0.0 < scenario["saving_pct"] < 100.0, scenario


def test_the_script_reports_what_it_measured(quick_run):
    _, results, out = quick_run
    assert all(check["holds"] for check in results["acceptance"])
    assert json.loads((out / "memory.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "memory.png").read_bytes().startswith(b"\x89PNG")
    readme = (out / "README_memory.md").read_text()
    assert readme.count("- PASS:") == len(results["acceptance"])
    paged_waste = row(results, "500-1000 tok, 32k max", "paged-16")["waste_pct"]
    assert f"| paged-16 | {paged_waste:.1f} |" in readme
