"""The README's demo and the examples run end to end (a short run keeps them from rotting)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example(*command: str) -> tuple[str, list[str], list[list[str]]]:
    """Run an example: its output, its lines, and its table rows (lines that start with a step)."""
    done = subprocess.run([*command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return done.stdout, lines, [line.split() for line in lines if line[:4].strip().isdigit()]


@pytest.mark.slow
def test_reference_kl_loop_runs():
    _, lines, rows = _example(
        sys.executable,
        str(ROOT / "examples" / "reference_kl_loop.py"),
        *("--steps", "3", "--sync-every", "2"),
    )
    assert any("KL(pol||ref)" in line for line in lines)
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert float(rows[0][2]) == 0.0  # step 0: the reference is the starting adapter
    assert all(float(r[4]) > 0 for r in rows)  # and every step moved the weights
    assert sum("reference <- 0.8 * reference + 0.2 * policy" in line for line in lines) == 1
    assert "all 16 tensor(s) moved" in lines


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    assert commands, ".ci/run has no README command"
    for command in commands:
        assert command in readme, f"{command!r} is not in README.md"


def _two_ranks(example: str, *args: str):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _example(
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-port", str(port), str(ROOT / "examples" / example), *args),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", ["fsdp2_reference_loop.py", "deepspeed_reference_loop.py"], ids=["fsdp2", "zero3"]
)
def test_the_sharded_examples_run_on_two_ranks(example):
    if example.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (.[deepspeed])")
    out, lines, rows = _two_ranks(example, "--steps", "3")
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(float(r[3]) > 0 for r in rows)  # the global delta grows from step 0
    assert "rank 0 holds 1,536 of the 3,072 reference values" in out
    assert "all 8 tensor(s) moved" in lines


@pytest.mark.slow
def test_trl_example_gives_zero_kl_at_step_1_where_trl_does_not():
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
    out, lines, rows = _example(
        sys.executable, str(ROOT / "examples" / "trl_grpo_reference.py"), "--steps", "2"
    )
    assert [int(r[0]) for r in rows] == [1, 2]
    assert float(rows[0][1]) == 0.0
    (summary,) = [line for line in lines if line.startswith("step-1 KL:")]
    assert summary.startswith("step-1 KL: 0 with the snapshot;")
    assert float(summary.split("; ")[1].split()[0]) != 0.0
    assert "adapters on the device: ['default']" in out
