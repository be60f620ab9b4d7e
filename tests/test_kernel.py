"""The fused C kernel of weight_delta: built where there is a compiler, exact where it runs,
never given a pair it would misread, and replaced by torch ops where it can't be built."""

import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import DELTA_PATHS, delta_path, peft_model
from hypothesis import given
from hypothesis import strategies as st

from fieldkit.training import (
    WeightDeltaTracker,
    _kernel,
    capture_trainable,
    weight_delta,
    weight_delta_path,
)

needs_kernel = pytest.mark.skipif(
    _kernel.library() is None, reason=f"no C kernel here: {_kernel.status()}"
)
UNIT = 1 << 16  # the kernel's piece size: sizes around it cross pieces and threads


def float32_difference_delta(pairs) -> tuple[float, float]:
    """The kernel's definition, in float64: (a - b) rounded to float32, squared and summed."""
    sq, mx = 0.0, 0.0
    for b, a in pairs:
        d = (a.float() - b.float()).double()
        sq += float(d.square().sum())
        mx = max(mx, float(d.abs().max()))
    return sq, mx


def needs_compiler() -> None:
    compiler = _kernel.compiler()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler!r}) on this machine: torch ops are the path here")


def test_kernel_builds_where_there_is_a_c_compiler():
    needs_compiler()
    if "FIELDKIT_NO_KERNEL is set" in _kernel.status():
        pytest.skip("FIELDKIT_NO_KERNEL is set for this run")
    assert _kernel.library() is not None, _kernel.status()
    assert _kernel.status().startswith("fused C kernel")


@needs_kernel
@given(
    st.lists(st.sampled_from([1, 7, 15, 16, 17, 100, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT + 5])),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
    st.sampled_from([1, 4096, 1 << 20]),
    st.integers(0, 2**31 - 1),
)
def test_kernel_equals_float64_over_tails_pieces_and_any_threads(sizes, dtype, scale, per, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(n, generator=g).to(dtype), (torch.randn(n, generator=g) * scale).to(dtype))
        for n in sizes
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_kernel, "PER_THREAD", per)  # 1: as many threads as torch has
        sq, mx = _kernel.measure(pairs)
        patch.setattr(_kernel, "PER_THREAD", 1 << 62)
        assert _kernel.measure(pairs) == (sq, mx)  # one thread: the same bits
    ref_sq, ref_mx = float32_difference_delta(pairs)
    assert mx == ref_mx  # exact: a max needs no rounding
    assert math.isclose(sq, ref_sq, rel_tol=1e-12)  # float64 sums, in another order


@needs_kernel
@pytest.mark.parametrize(
    "value, expected",
    [(math.nan, (math.nan, math.nan)), (math.inf, (math.inf, math.inf))],
)
def test_kernel_nan_and_inf_anywhere(value, expected):
    for where in (0, 5, 16, UNIT + 3):
        after = torch.zeros(UNIT + 20)
        after[where] = value
        got = weight_delta({"w": torch.zeros(UNIT + 20)}, {"w": after})
        assert got == expected or (math.isnan(got[0]) and math.isnan(got[1]))


@needs_kernel
def test_pairs_the_kernel_would_misread_go_through_torch_ops():
    """Strided views, mixed or other dtypes: the same figures as through torch ops."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 6, generator=g)
    after = {
        "t": base.t(),  # transposed: contiguous storage, other order
        "s": torch.randn(6, 12, generator=g)[:, ::2],  # strided
        "mixed": torch.randn(5, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "double": torch.randn(5, generator=g).double(),
    }
    before = {
        "t": base.clone(),
        "s": torch.randn(6, 6, generator=g),
        "mixed": torch.randn(5, generator=g).bfloat16(),
        "half": torch.randn(5, generator=g).half(),
        "double": torch.randn(5, generator=g).double(),
    }
    assert not any(_kernel.fusable(before[k], after[k]) for k in after)
    with delta_path("kernel"):
        got = weight_delta(before, after)
    with delta_path("torch"):
        assert got == weight_delta(before, after)


@pytest.mark.parametrize("path", DELTA_PATHS)
def test_tracker_follows_a_parameter_re_strided_in_place(path):
    """``p.data = p.data.t()`` keeps the storage address and shape (square) but not the order:
    the tracker must notice, not read memory in the old order."""
    model = torch.nn.Linear(4, 4, bias=False)
    with delta_path(path):
        tracker = WeightDeltaTracker(model)
        assert tracker.delta() == (0.0, 0.0)
        before = model.weight.detach().clone()
        model.weight.data = model.weight.data.t()
        assert tracker.delta() == weight_delta({"w": before}, {"w": model.weight.detach()})
        assert tracker.delta()[0] > 0


def test_without_a_compiler_weight_delta_uses_torch_ops_and_says_why(tmp_path, monkeypatch):
    model = peft_model("linear", seed=3)
    start = capture_trainable(model)
    tracker = WeightDeltaTracker(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    expected = tracker.delta()  # through the kernel where there is one
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FIELDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FIELDKIT_NO_KERNEL", raising=False)
    _kernel._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"torch ops on the CPU .*no-such-cc"):
            assert _kernel.library() is None
        assert "could not be built" in _kernel.status() and "no-such-cc" in _kernel.status()
        assert weight_delta_path() == _kernel.status()  # the public way to ask
        for got in (tracker.delta(), weight_delta(start, dict(model.named_parameters()))):
            assert math.isclose(got[0], expected[0], rel_tol=1e-6) and got[1] == expected[1]
    finally:
        _kernel._build.cache_clear()  # the next call builds (or finds) the real one again


def test_nothing_is_built_when_no_pair_could_use_the_kernel():
    """A GPU machine measures CUDA tensors only: it never runs (or misses) a C compiler."""
    _kernel._build.cache_clear()
    try:
        pairs = {"d": torch.zeros(3, dtype=torch.float64), "h": torch.zeros(3, dtype=torch.half)}
        assert weight_delta(pairs, {k: v + 1 for k, v in pairs.items()}) == (math.sqrt(6), 1.0)
        assert _kernel._build.cache_info().currsize == 0
    finally:
        _kernel._build.cache_clear()


def test_kernel_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    needs_compiler()
    monkeypatch.setenv("FIELDKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("FIELDKIT_NO_KERNEL", raising=False)
    _kernel._build.cache_clear()
    try:
        assert _kernel.library() is not None
        built = list((tmp_path / "fieldkit").iterdir())
        assert [p.suffix for p in built] == [".so"]  # no temporary left behind
        stamp = built[0].stat().st_mtime_ns
        _kernel._build.cache_clear()
        assert _kernel.library() is not None
        assert list((tmp_path / "fieldkit").iterdir()) == built
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        _kernel._build.cache_clear()


def test_ranks_building_at_once_share_one_file(tmp_path):
    """Ranks of a first run on a fresh machine all build the kernel at the same moment."""
    needs_compiler()
    code = "from fieldkit.training import _kernel as k; assert k.library(), k.status()"
    env = {**os.environ, "FIELDKIT_CACHE": str(tmp_path), "FIELDKIT_NO_KERNEL": "0"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr.read().decode()
    assert [p.suffix for p in (tmp_path / "fieldkit").iterdir()] == [".so"]


def test_kernel_source_is_right_on_aarch64_under_qemu(tmp_path):
    """The DGX Spark's CPU is aarch64 (NEON, not SSE/AVX): build the same source for it and
    run the standalone check (``kernel_check.c``) under qemu."""
    tools = ["aarch64-linux-gnu-gcc", "qemu-aarch64"]
    if not all(map(shutil.which, tools)):
        pytest.skip(f"needs {' and '.join(tools)} (.ci/run installs them with apt-get)")
    here = pathlib.Path(__file__).parent
    exe = tmp_path / "kernel_check"
    sources = [str(here / "kernel_check.c"), str(_kernel.SOURCE)]
    subprocess.run(
        [tools[0], "-O3", "-static", "-pthread", *sources, "-o", str(exe), "-lm"],
        check=True,
        capture_output=True,
    )
    done = subprocess.run([tools[1], str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(") ok\n") == 8, done.stdout  # all eight cases ran
