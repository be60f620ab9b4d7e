"""WeightDeltaTracker and weight_delta on real training steps."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DELTA_PATHS, TOKENS, delta_path, peft_model

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    _delta,
    capture_trainable,
    weight_delta,
)


def _train(model, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(TOKENS).logits
        F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def test_delta_after_training_matches_a_hand_computation():
    model = peft_model("linear", seed=2).train()
    before = {
        n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    tracker = WeightDeltaTracker(model)
    assert tracker.delta() == (0.0, 0.0)
    _train(model, steps=2, lr=1e-2)
    l2, max_abs = tracker.delta()
    diffs = [p.detach().double() - before[n] for n, p in model.named_parameters() if n in before]
    assert l2 > 0 and max_abs > 0
    assert math.isclose(l2, math.sqrt(sum(float((d * d).sum()) for d in diffs)), rel_tol=1e-6)
    assert math.isclose(max_abs, max(float(d.abs().max()) for d in diffs), rel_tol=1e-6)
    assert len(tracker) == len(before) == 8
    assert repr(tracker).startswith("WeightDeltaTracker(tensors=8")


def test_zero_learning_rate_moves_nothing():
    model = peft_model("linear", seed=2).train()
    tracker = WeightDeltaTracker(model)
    _train(model, steps=1, lr=0.0)
    assert tracker.delta() == (0.0, 0.0)


def test_nothing_trainable_gives_zero_and_late_trainables_are_ignored():
    model = peft_model("linear", seed=2)
    model.requires_grad_(False)
    tracker = WeightDeltaTracker(model)
    assert len(tracker) == 0 and tracker.delta() == (0.0, 0.0)
    tracker.reset()
    assert tracker.report().rows == () and "all 0 tensor(s) moved" in str(tracker.report())
    model.requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert tracker.delta() == (0.0, 0.0)


def test_bfloat16_deltas_accumulate_in_float32_or_wider():
    # 4096 differences of 2**-9 each: a bfloat16 running sum of squares would stall long before
    # the true total; the exact answer is sqrt(4096) * 2**-9 = 0.125.
    before = {"w": torch.ones(64, 64, dtype=torch.bfloat16)}
    after = {"w": torch.full((64, 64), 1 + 2**-7, dtype=torch.bfloat16)}
    l2, max_abs = weight_delta(before, after)
    assert (l2, max_abs) == (64 * 2**-7, 2**-7)


def test_live_model_is_measured_without_a_copy_and_shape_mismatch_is_named():
    model = peft_model("linear", seed=2)
    state = capture_trainable(model)
    assert weight_delta(state, dict(model.named_parameters())) == (0.0, 0.0)
    name = next(iter(state))
    with pytest.raises(ValueError, match=rf"'{name}': before \(2, 2\), after \(4, 16\)"):
        weight_delta({name: torch.zeros(2, 2)}, dict(model.named_parameters()))


def test_tracker_follows_the_model_replaced_modules_and_swapped_storage_included():
    model = peft_model("linear", seed=2)
    start = capture_trainable(model)
    tracker = WeightDeltaTracker(model)
    # A module replaced by user code: the tracker measures the new parameter under that name.
    name = next(n for n in start if n.endswith("lora_A.default.weight"))
    owner = model.get_submodule(name.rsplit(".", 2)[0])
    fresh = torch.nn.Linear(owner["default"].in_features, owner["default"].out_features, bias=False)
    owner["default"] = fresh
    expected = weight_delta(start, dict(model.named_parameters()))
    assert expected[0] > 0 and tracker.delta() == expected
    # A pointer swap re-points the storage: inside it the tracker refuses (it would measure
    # the reference), and after it the tracker follows the storage back.
    reference = {n: v + 1.0 for n, v in start.items()}
    with LoraReferenceSnapshot(model, snapshot=reference):
        with pytest.raises(RuntimeError, match="would read the reference's values"):
            tracker.delta()
    assert tracker.delta() == expected


def len_of(state):
    return sum(t.numel() for t in state.values())


@pytest.mark.parametrize("path", DELTA_PATHS)
def test_a_non_contiguous_trainable_parameter_is_measured_every_time(path):
    """The plan must not keep a one-time flat copy of a strided parameter (it would read 0
    forever): a transposed view and a channels-last conv weight."""
    with delta_path(path):
        model = torch.nn.Module()
        base = torch.nn.Parameter(torch.randn(6, 4))
        model.tied = torch.nn.Parameter(base.detach().t())  # a transposed view, as peft ties
        model.conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        assert not model.tied.is_contiguous() and not model.conv.weight.is_contiguous()
        tracker = WeightDeltaTracker(model)
        for step in (1.0, 2.0):
            with torch.no_grad():
                model.tied.add_(1.0)
                model.conv.weight.add_(1.0)
            expected = weight_delta(tracker._before, dict(model.named_parameters()))
            assert tracker.delta() == expected and math.isclose(expected[1], step, rel_tol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_the_torch_ops_scratch_is_one_run_however_large_the_tensor(layout):
    """The scratch buffer was as large as the largest tensor (51 MB for a 12.8M-element
    embedding); a tensor bigger than a run is now cut into runs."""
    rows = _delta.CHUNK // 64 * 3 + 5  # three runs and a bit
    with delta_path("torch"):
        model = torch.nn.Module()
        w = torch.randn(rows, 64) if layout == "contiguous" else torch.randn(64, rows).t()
        model.w = torch.nn.Parameter(w)
        tracker = WeightDeltaTracker(model)
        before = tracker._before["w"].clone()
        with torch.no_grad():
            model.w.add_(torch.randn(rows, 64))
        l2, max_abs = tracker.delta()
        scratch = {
            run.diff.untyped_storage().nbytes() for p in tracker._plan.parts for run in p.runs
        }
    d = model.w.detach() - before  # in float32, as the tracker takes it
    assert math.isclose(l2, float(d.double().square().sum().sqrt()), rel_tol=1e-6)
    assert max_abs == float(d.abs().max())
    assert max(scratch) <= _delta.CHUNK * 4


def test_a_tracker_made_in_inference_mode_works_outside_it():
    model = torch.nn.Linear(3, 2)
    with torch.inference_mode():
        tracker = WeightDeltaTracker(model)
        assert tracker.delta() == (0.0, 0.0)
    with torch.no_grad():
        model.bias.add_(0.5)
    assert tracker.delta()[1] == 0.5
    tracker.reset()
    assert tracker.delta() == (0.0, 0.0)


def test_a_whole_state_dict_holds_copies_on_an_unsharded_model():
    """state_dict(whole=True) gathers only sharded tensors; the rest are copies, as always."""
    model = torch.nn.Linear(2, 2)
    tracker = WeightDeltaTracker(model)
    whole = tracker.state_dict(whole=True)
    whole["weight"].add_(1.0)  # the caller's copy, not the tracker's starting point
    assert tracker.delta() == (0.0, 0.0)
