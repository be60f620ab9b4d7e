"""python -m fieldkit.training diff / inspect, through a subprocess, on adapters peft saved."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import peft_model
from safetensors.torch import load_file


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fieldkit.training", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    peft_model("linear", seed=1).save_pretrained(root / "a")
    peft_model("linear", seed=2).save_pretrained(root / "b")
    peft_model("linear", seed=2, target_modules=["q_proj", "k_proj"]).save_pretrained(root / "c")
    peft_model("linear", seed=2, r=8).save_pretrained(root / "r8")
    return root


def test_diff_matches_a_float64_computation_and_sorts_by_l2(adapters):
    done = _cli("diff", adapters / "a", adapters / "b", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    a = load_file(adapters / "a" / "adapter_model.safetensors")
    b = load_file(adapters / "b" / "adapter_model.safetensors")
    diffs = {k: (b[k].double() - a[k].double()) for k in a}
    assert math.isclose(got["l2"], math.sqrt(sum(float(d.square().sum()) for d in diffs.values())))
    assert got["max_abs"] == max(float(d.abs().max()) for d in diffs.values())
    assert got["compared"] == len(a) == len(got["tensors"])
    l2s = [t["l2"] for t in got["tensors"]]
    assert l2s == sorted(l2s, reverse=True)
    for t in got["tensors"]:
        assert math.isclose(t["l2"], float(torch.linalg.vector_norm(diffs[t["key"]])))
    assert got["only_in_a"] == got["only_in_b"] == got["shape_mismatch"] == []


def test_diff_lists_missing_keys_and_shape_mismatches_and_top_n(adapters):
    done = _cli("diff", adapters / "a", adapters / "c", "--json", "--top", "2")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert len(got["tensors"]) == 2 and got["compared"] == 4
    assert all(".v_proj." in k for k in got["only_in_a"]) and len(got["only_in_a"]) == 4
    assert all(".k_proj." in k for k in got["only_in_b"]) and len(got["only_in_b"]) == 4
    text = _cli("diff", adapters / "a", adapters / "c", "--top", "2").stdout
    assert "only in A (4)" in text and "only in B (4)" in text and "... 2 more (--top)" in text
    nothing = _cli("diff", adapters / "a", adapters / "r8", "--json")
    assert nothing.returncode == 1 and "share no tensor" in nothing.stderr  # not "unchanged"
    mismatch = json.loads(nothing.stdout)
    assert mismatch["compared"] == 0 and len(mismatch["shape_mismatch"]) == 8
    assert mismatch["shape_mismatch"][0]["shape_a"] == [4, 16]


def test_diff_of_an_adapter_with_itself_is_zero(adapters):
    file = adapters / "a" / "adapter_model.safetensors"
    got = json.loads(_cli("diff", adapters / "a", file, "--json").stdout)
    assert (got["l2"], got["max_abs"]) == (0.0, 0.0) and len(got["unchanged"]) == 8


def test_inspect_lists_keys_shapes_dtypes_and_the_config(adapters):
    got = json.loads(_cli("inspect", adapters / "r8", "--json").stdout)
    assert len(got["tensors"]) == 8 and got["parameters"] == 8 * 8 * 16
    assert {tuple(t["shape"]) for t in got["tensors"]} == {(8, 16), (16, 8)}
    assert {t["dtype"] for t in got["tensors"]} == {"F32"}
    assert got["config"]["r"] == 8 and got["config"]["peft_type"] == "LORA"
    text = _cli("inspect", adapters / "r8").stdout
    assert "8 tensors, 1,024 parameters" in text and "r=8" in text


def test_bad_paths_and_files_exit_2_with_a_message(adapters, tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty").mkdir()
    cases = [
        (("inspect", tmp_path / "nope"), "no such file or directory"),
        (
            ("diff", adapters / "a", tmp_path / "empty"),
            "no weights file 'adapter_model.safetensors'",
        ),
        (("inspect", tmp_path / "garbage"), "cannot read"),
        (("diff", tmp_path / "garbage", adapters / "a"), "cannot read"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stdout)
        assert message in done.stderr and done.stdout == ""
    usage = _cli("diff", adapters / "a")
    assert usage.returncode == 2 and "usage:" in usage.stderr
    assert _cli("diff", adapters / "a", adapters / "b", "--top", "-1").returncode == 2


def _without(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where ``module`` cannot be imported, as if not installed."""
    code = (
        f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['x', *{list(args)!r}]; "
        "runpy.run_module('fieldkit.training', run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_without_torch_help_works_and_commands_say_what_to_install(adapters):
    done = _without("torch", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    done = _without("torch", "diff", str(adapters / "a"), str(adapters / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "needs PyTorch" in done.stderr and "fieldkit-training" in done.stderr


def test_without_safetensors_the_cli_exits_2_with_a_message(adapters):
    done = _without("safetensors", "inspect", str(adapters / "a"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "needs safetensors" in done.stderr


def test_version_says_which_cpu_delta_path():
    from fieldkit.training import weight_delta_path

    done = _cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == f"weight_delta on the CPU: {weight_delta_path()}"
