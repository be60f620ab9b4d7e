"""A short run of the benchmark keeps it from rotting: every method checked, every figure there."""

import importlib.util
import json
import math
import pathlib

import pytest

from fieldkit.training import _kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "swap_bench", ROOT / "benchmarks" / "swap_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_checks_and_reports_every_method(tmp_path, capsys):
    # The run itself asserts each method's correctness before timing it.
    result = _bench().main(["--quick", "--rounds", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "swap_bench.json").read_text()) == result
    assert [c["case"] for c in result["cases"]] == ["default", "bfloat16", "small"]
    for case in result["cases"]:
        assert case["floor_ms"] > 0 and case["forward_ms"] > 0
        swaps = {row["method"]: row for row in case["swap"]}
        assert len(swaps) == 11 and "fieldkit snapshot, mode='copy'" in swaps
        assert "fieldkit snapshot, mode='pointer', check_writes=True" in swaps
        for row in case["swap"] + case["delta"]:
            if "skipped" in row:
                assert row["skipped"].startswith("skipped: "), row
                continue
            assert 0 < row["min_ms"] <= row["median_ms"]
        for section, floor in (("swap", "floor_ms"), ("delta", "delta_floor_ms")):
            for row in case[section]:  # each table against the floor timed in its own rounds
                if "skipped" not in row:
                    assert math.isclose(row["x_floor"], row["median_ms"] / case[floor])
        deltas = {row["method"]: row for row in case["delta"]}
        assert deltas["fieldkit WeightDeltaTracker.delta()"]["peak_extra_bytes"] >= 0
    assert result["machine"]["weight_delta on the CPU"] == _kernel.status()
    assert [s["r"] for s in result["sweep"]] == [2, 4]
    out = capsys.readouterr().out
    assert out.count("| method") == 3 and "x floor" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "swap_bench.png").stat().st_size > 0


@pytest.mark.slow
def test_several_runs_give_medians_and_their_spread(tmp_path):
    bench = _bench()
    result = bench.main(
        ["--quick", "--rounds", "1", "--runs", "2", "--device", "cpu", "--out", str(tmp_path)]
    )
    assert len(result["runs"]) == 2 and result["cases"][0]["runs"] == 2
    for i, case in enumerate(result["cases"]):
        for j, row in enumerate(case["delta"]):
            ratios = [run[i]["delta"][j]["x_floor"] for run in result["runs"]]
            assert tuple(row["x_floor_runs"]) == (min(ratios), max(ratios))
            assert min(ratios) <= row["x_floor"] <= max(ratios)


def test_a_quick_run_never_writes_over_the_committed_results():
    bench = _bench()
    assert bench.default_out(quick=True) == ROOT / "benchmarks" / "results-quick"
    assert bench.default_out(quick=False) == ROOT / "benchmarks" / "results"
