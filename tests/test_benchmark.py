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


@pytest.mark.slow
def test_the_engine_benchmark_runs_every_reference_on_two_ranks(tmp_path):
    """Its tiny form: each engine x reference on two gloo ranks, every figure there (checked,
    not timed). In a fresh interpreter: the benchmark forks its ranks from a parent that has
    run no torch op."""
    import subprocess
    import sys

    engines = ["fsdp2"] + (["zero3"] if importlib.util.find_spec("deepspeed") else [])
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "engine_bench.py"),
            "--tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--engines",
            *engines,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "engine_bench.json").read_text())
    assert (
        sorted(report["results"]) == sorted(engines) and (tmp_path / "engine_bench.png").is_file()
    )
    for engine, rows in report["results"].items():
        expected = {"none", "fieldkit", "fieldkit-first", "trl-disabled", "trl-ref-adapter"}
        expected |= {"separate-model"} | ({"fieldkit-in-step"} if engine == "zero3" else set())
        assert set(rows) == expected, engine
        for config, row in rows.items():
            assert row["step_s"] > 0 and row["peak_bytes"] > 0, (engine, config)
            assert (row["reference_forward_s"] > 0) is (config != "none"), (engine, config)
            assert (row["swap_s"] > 0) is config.startswith("fieldkit"), (engine, config)
        held = {c: set(row["held_bytes"]) - {"model"} for c, row in rows.items()}
        assert held["fieldkit"] == {"snapshot (host)"} and held["trl-disabled"] == set()
        assert held["trl-ref-adapter"] == {"ref adapter"}
        assert held["separate-model"] == {"reference model"}
        assert rows["none"]["invalidations_per_step"] == 0
        assert rows["separate-model"]["invalidations_per_step"] == 0
    assert report["seven_b"]["computed, not measured"]
    assert "step ms" in done.stdout and "fieldkit" in done.stdout


def test_the_engine_benchmark_shards_for_fsdp2_on_a_device_with_an_index(tmp_path):
    """A CUDA rank's device is ``cuda:<rank>``; ``init_device_mesh`` takes only the type (the
    first GPU check stopped here with "Device type with index is not supported"). The same
    call with ``cpu:0``, on a gloo world of one."""
    import torch
    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location(
        "engine_bench", ROOT / "benchmarks" / "engine_bench.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = bench._model(bench.TINY, seed=0)
        bench._shard_fsdp2(model, "cpu:0")
        lora = [p for p in model.parameters() if p.requires_grad]
        assert lora and all(type(p).__name__ == "DTensor" for p in lora)
        assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 128)
    finally:
        dist.destroy_process_group()
