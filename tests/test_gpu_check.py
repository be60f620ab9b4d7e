"""The one-command GPU check, run dry (no CUDA here) so that it cannot rot before a GPU runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run the check for real")
def test_the_gpu_check_runs_dry_says_what_it_skipped_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[:7]
    assert [line.split(":")[0] for line in first] == [
        "python",
        "torch",
        "cuda",
        "peft",
        "transformers",
        "gpu",
        "gpus",
    ]
    result = json.loads((tmp_path / "gpu_report.json").read_text())
    tests = result["tests"]
    assert tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 18
    assert all(t["why"].startswith("needs") for t in tests["tests"])
    assert result["skipped"] and "no CUDA device" in result["skipped"][0]
    (case,) = result["cases"]
    assert case["case"].startswith("dry run") and case["floor_ms"] > 0
    report = (tmp_path / "gpu_report.md").read_text()
    assert "**Skipped:** no CUDA device" in report and "| method" in report
