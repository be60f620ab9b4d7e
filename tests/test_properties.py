"""Property tests: swap/restore round trip over random module trees; weight_delta's math."""

import math

import pytest
import torch
from helpers import DELTA_PATHS, assert_unchanged, bits, delta_path, fingerprint
from hypothesis import given
from hypothesis import strategies as st
from strategies import module_trees, state_pairs, states_for, tensors

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    _delta,
    _sharding,
    capture_trainable,
    restore,
    swap_in,
    weight_delta,
)

MODES = st.sampled_from(["pointer", "copy"])


@given(st.data(), MODES)
def test_swap_in_sets_values_and_restore_is_bit_exact(data, mode):
    model = data.draw(module_trees())
    state = data.draw(states_for(model))
    before = fingerprint(model)
    grad_mode = torch.is_grad_enabled()

    displaced = swap_in(model, state, mode=mode)
    assert displaced.mode == mode

    params = dict(model.named_parameters())
    for name, value in state.items():
        assert torch.equal(bits(params[name]), bits(value))
        assert params[name] is before[name][0]
        assert params[name].requires_grad == before[name][2]
    for name in params.keys() - state.keys():
        assert torch.equal(bits(params[name]), before[name][1])
    restore(model, displaced)
    assert_unchanged(model, before)
    assert torch.is_grad_enabled() == grad_mode


@given(st.data())
def test_capture_trainable_copies_exactly_the_trainable_parameters(data):
    model = data.draw(module_trees())
    captured = capture_trainable(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert captured.keys() == trainable.keys()
    for name, p in trainable.items():
        c = captured[name]
        assert (c.device.type, c.dtype, c.shape, c.requires_grad) == (
            "cpu",
            p.dtype,
            p.shape,
            False,
        )
        assert torch.equal(bits(c), bits(p))
        if p.numel():
            assert c.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


def _float64_delta(before, after):
    sq, mx = 0.0, 0.0
    for name, b in before.items():
        d = (after[name].detach().double() - b.double()).reshape(-1)
        sq += float((d * d).sum())
        mx = max([mx, *d.abs().tolist()])
    return math.sqrt(sq), mx


def _assert_float64_delta(got, before, after):
    """``got`` is ``(l2, max_abs)`` of ``after - before`` as float64 computes them."""
    ref_l2, ref_max = _float64_delta(before, after)
    assert math.isclose(got[0], ref_l2, rel_tol=1e-6, abs_tol=1e-30)
    assert math.isclose(got[1], ref_max, rel_tol=1e-6, abs_tol=1e-30)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(state_pairs())
def test_weight_delta_equals_a_float64_computation(path, pair):
    with delta_path(path):
        before, after = pair
        _assert_float64_delta(weight_delta(before, after), before, after)


@given(state_pairs(), st.integers(1, 40), st.booleans())
def test_weight_delta_in_small_runs_and_packed_equals_a_float64_computation(pair, chunk, packed):
    """Runs of several tensors, tensors bigger than a run, and ``before`` packed back to back in
    one buffer (as the tracker keeps it) or not: the same figures."""
    before, after = pair
    if packed and before:
        flat = torch.cat([b.reshape(-1).double() for b in before.values()])
        views = torch.split(flat, [b.numel() for b in before.values()])
        before = {k: v.view(b.shape) for (k, b), v in zip(before.items(), views, strict=True)}
        after = {k: a.double() for k, a in after.items()}
    with pytest.MonkeyPatch.context() as patch, delta_path("torch"):  # CHUNK is torch ops'
        patch.setattr(_delta, "CHUNK", chunk)
        got = weight_delta(before, after)
        plan = _delta.DeltaPlan(list(before.values()), [after[k] for k in before])
    _assert_float64_delta(got, before, after)
    for run in (run for part in plan.parts for run in part.runs):  # a tensor bigger is cut
        assert run.diff.untyped_storage().nbytes() <= chunk * run.diff.element_size()


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(st.data())
def test_tracker_equals_weight_delta_over_random_trees(path, data):
    with delta_path(path):
        model = data.draw(module_trees())
        tracker = WeightDeltaTracker(model)
        before = capture_trainable(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(data.draw(tensors(shape=p.shape, dtype=p.dtype, specials=False)))
        live = dict(model.named_parameters())
        got, expected = tracker.delta(), weight_delta(before, live)
        if all(map(math.isnan, got + expected)):  # NaN from the initial values
            return
        assert got == expected
        _assert_float64_delta(got, before, live)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(st.sampled_from([1e-30, 1e-20, 1e20, 1e30]), st.integers(1, 3000))
def test_weight_delta_survives_float32_overflow_and_underflow(path, scale, n):
    with delta_path(path):
        before = {"w": torch.zeros(n)}
        after = {"w": torch.full((n,), scale)}
        l2, max_abs = weight_delta(before, after)
        assert math.isclose(l2, math.sqrt(n) * float(torch.tensor(scale)), rel_tol=1e-6)
        assert max_abs == float(torch.tensor(scale))


@pytest.mark.parametrize("path", DELTA_PATHS)
def test_weight_delta_with_nan_is_nan(path):
    with delta_path(path):
        l2, max_abs = weight_delta({"w": torch.zeros(3)}, {"w": torch.tensor([1.0, math.nan, 2.0])})
        assert math.isnan(l2) and math.isnan(max_abs)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(state_pairs())
def test_weight_delta_of_identical_states_is_zero(path, pair):
    with delta_path(path):
        before, _ = pair
        assert weight_delta(before, before) == (0.0, 0.0)
        assert weight_delta(before, {k: v.clone() for k, v in before.items()}) == (0.0, 0.0)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(state_pairs())
def test_weight_delta_is_symmetric(path, pair):
    with delta_path(path):
        before, after = pair
        assert weight_delta(before, after) == weight_delta(after, before)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(state_pairs())
def test_weight_delta_bounds(path, pair):
    with delta_path(path):
        before, after = pair
        l2, max_abs = weight_delta(before, after)
        numel = sum(t.numel() for t in before.values())
        assert max_abs <= l2 * (1 + 1e-12)
        assert l2 <= math.sqrt(numel) * max_abs * (1 + 1e-6)


@pytest.mark.parametrize("path", DELTA_PATHS)
@given(state_pairs(), st.sets(st.text("abcxyz.", min_size=1, max_size=6)))
def test_weight_delta_counts_only_names_found_in_after(path, pair, dropped):
    with delta_path(path):
        before, after = pair
        kept = {k: v for k, v in after.items() if k not in dropped}
        _assert_float64_delta(weight_delta(before, kept), {k: before[k] for k in kept}, kept)


@given(st.data(), MODES)
def test_snapshot_class_round_trip_over_random_trees(data, mode):
    model = data.draw(module_trees())
    if not any(p.requires_grad for p in model.parameters()):  # it would hold nothing
        with pytest.raises(ValueError, match="no trainable parameter"):
            LoraReferenceSnapshot(model, mode=mode)
        return
    snap = LoraReferenceSnapshot(model, mode=mode)
    with torch.no_grad():  # "training" moves every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(data.draw(tensors(shape=p.shape, dtype=p.dtype)))
    before = fingerprint(model)
    with snap:
        params = dict(model.named_parameters())
        for name, value in snap.state.items():
            assert torch.equal(bits(params[name]), bits(value))
    assert_unchanged(model, before)


@given(st.data(), MODES)
def test_a_bad_entry_anywhere_changes_nothing(data, mode):
    model = data.draw(module_trees())
    state = data.draw(states_for(model))
    bad = data.draw(
        st.sampled_from(
            ["unknown name", "wrong shape", "wrong dtype"] if state else ["unknown name"]
        )
    )
    if bad == "unknown name":
        state["not.a.parameter"] = torch.zeros(1)
    else:
        name = data.draw(st.sampled_from(sorted(state)))
        value = state[name]
        state[name] = (
            torch.zeros((*value.shape, 2), dtype=value.dtype)
            if bad == "wrong shape"
            else value.to(torch.float64 if value.dtype != torch.float64 else torch.float32)
        )
    before = fingerprint(model)
    with pytest.raises(ValueError, match="Nothing was changed"):
        swap_in(model, state, mode=mode)
    assert_unchanged(model, before)


@given(module_trees())
def test_the_one_walk_parameter_listing_equals_named_parameters(model):
    got = list(_sharding.named_parameters(model).items())
    expected = list(model.named_parameters())
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))
