"""WeightDeltaTracker.report(): per-tensor figures and why a tensor did not move; soft updates."""

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import TOKENS, assert_unchanged, base_model, fingerprint, peft_model
from hypothesis import given
from hypothesis import strategies as st
from strategies import DTYPES, tensors

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    capture_trainable,
    soft_update_,
)


def _step(model, lr, optimizer=torch.optim.SGD):
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(TOKENS).logits
    F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)).backward()
    opt.step()


def test_first_step_with_zero_initialised_lora_b_names_lora_a():
    model = peft.get_peft_model(base_model(0), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    tracker = WeightDeltaTracker(model)
    _step(model, lr=0.1)
    report = tracker.report()
    rows = {r.name: r for r in report.rows}
    assert {n for n, r in rows.items() if not r.moved} == {n for n in rows if "lora_A" in n}
    assert all(r.cause == "zero-init partner" for r in report.unmoved)
    assert all(r.moved and r.rel == math.inf for n, r in rows.items() if "lora_B" in n)
    assert "lora_B / lora_embedding_A start at zero" in report.diagnosis()
    # The second step moves everything (Adam: each step is about lr, however small the grad).
    tracker.reset()
    model.zero_grad()
    _step(model, lr=1e-2, optimizer=torch.optim.Adam)
    assert not tracker.report().unmoved


def test_embedding_lora_first_step_names_lora_embedding_b():
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"])
    model = peft.get_peft_model(base_model(0), config)
    tracker = WeightDeltaTracker(model)
    _step(model, lr=0.1)
    unmoved = tracker.report().unmoved
    assert [r.name.split(".")[-2] for r in unmoved] == ["lora_embedding_B"]
    assert unmoved[0].cause == "zero-init partner"


def test_bfloat16_update_that_rounds_away_is_named():
    model = peft_model("linear", seed=2).to(torch.bfloat16)
    tracker = WeightDeltaTracker(model)
    _step(model, lr=1e-12)  # far below half an ulp of bfloat16 weights of size ~0.3
    report = tracker.report()
    assert len(report.unmoved) == len(report.rows) == 8
    assert {r.cause for r in report.unmoved} == {"rounded away"}
    assert all(r.unchanged == 1.0 and r.dtype == "bfloat16" for r in report.rows)
    assert "bfloat16 with a non-zero gradient" in report.diagnosis()


def test_frozen_tensor_learning_rate_zero_and_no_gradient_are_told_apart():
    model = peft_model("linear", seed=2)
    tracker = WeightDeltaTracker(model)
    names = list(capture_trainable(model))
    model.get_parameter(names[0]).requires_grad_(False)
    _step(model, lr=0.0)
    causes = {r.name: r.cause for r in tracker.report().unmoved}
    assert causes[names[0]] == "frozen"
    assert {causes[n] for n in names[1:]} == {"not stepped"}
    model.zero_grad(set_to_none=True)
    assert tracker.report().rows[1].cause == "no gradient"


def test_report_figures_match_float64_and_print_as_a_table():
    model = peft_model("linear", seed=2)
    before = {
        n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    tracker = WeightDeltaTracker(model)
    _step(model, lr=1e-2)
    report = tracker.report()
    for row in report.rows:
        d = model.get_parameter(row.name).detach().double() - before[row.name]
        assert math.isclose(row.l2, float(d.norm()), rel_tol=1e-12)
        assert row.max_abs == float(d.abs().max())
        assert math.isclose(row.rel, float(d.norm() / before[row.name].norm()), rel_tol=1e-12)
        assert row.moved and row.cause is None and row.shape in {(4, 16), (16, 4)}
    assert math.isclose(report.l2, tracker.delta()[0], rel_tol=1e-6)
    text = str(report)
    assert text.splitlines()[0].split()[:3] == ["tensor", "shape", "dtype"]
    assert "all 8 tensor(s) moved" in text and len(report.to_dict()["rows"]) == 8


# --- soft reference updates ----------------------------------------------------------------


def _assert_mix(got, ref, pol, alpha):
    """``got`` is (1 - alpha)·ref + alpha·pol, computed in float64, to a few ulps of the terms."""
    a, b = (1 - alpha) * ref.double(), alpha * pol.double()
    bound = 4 * torch.finfo(got.dtype).eps * (a.abs() + b.abs()) + torch.finfo(got.dtype).tiny
    assert ((got.double() - (a + b)).abs() <= bound).all()


@given(st.sampled_from(DTYPES), st.floats(0.0, 1.0), st.data())
def test_soft_update_equals_a_float64_computation(dtype, alpha, data):
    shape = data.draw(st.sampled_from([(3,), (2, 5), (0,), ()]))
    ref = data.draw(tensors(shape=shape, dtype=dtype, specials=False))
    pol = data.draw(tensors(shape=shape, dtype=dtype, specials=False))
    state = {"w": ref.clone()}
    soft_update_(state, {"w": pol}, alpha)
    _assert_mix(state["w"], ref, pol, alpha)
    if alpha == 0.0:
        assert torch.equal(state["w"], ref)
    if alpha == 1.0:
        assert torch.equal(state["w"], pol)


def test_snapshot_update_and_refresh_against_the_policy():
    model = peft_model("linear", seed=2)
    snap = LoraReferenceSnapshot(model)
    ref0 = {n: v.clone() for n, v in snap.state.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    policy = capture_trainable(model)
    before = fingerprint(model)
    snap.update_(model, 0.25)
    for n, v in snap.state.items():
        _assert_mix(v, ref0[n], policy[n], 0.25)
    assert_unchanged(model, before)  # only the snapshot changes
    snap.update_(model, 0.0)
    snap.refresh(model)
    assert all(torch.equal(v, policy[n]) for n, v in snap.state.items())
    with snap:  # the refreshed reference is the policy itself
        same = model(TOKENS).logits
    torch.testing.assert_close(same, model(TOKENS).logits.detach(), rtol=0, atol=0)


def test_bad_alpha_an_entered_snapshot_and_a_foreign_model_are_clear_errors():
    model = peft_model("linear", seed=2)
    snap = LoraReferenceSnapshot(model)
    state = {n: v.clone() for n, v in snap.state.items()}
    for alpha, error in [
        (-0.1, ValueError),
        (1.5, ValueError),
        (math.nan, ValueError),
        ("0.5", TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(error, match="alpha must be"):
            snap.update_(model, alpha)
    with snap, pytest.raises(RuntimeError, match="entered"):
        snap.update_(model, 0.5)
    other = peft_model("linear", seed=2, r=8)
    with pytest.raises(ValueError, match="shape or dtype mismatch"):
        snap.update_(other, 0.5)
    with pytest.raises(ValueError, match="Unexpected key"):
        snap.refresh(peft_model("linear", seed=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="policy has no value for"):
        soft_update_(snap.state, {}, 0.5)
    assert all(torch.equal(v, state[n]) for n, v in snap.state.items())
