"""Swap behaviour on real peft models: the class, the guarantees, the failure modes."""

import accelerate
import pytest
import torch
import torch.nn.functional as F
from helpers import TOKENS, assert_unchanged, fingerprint, logits, peft_model, perturb

from fieldkit.training import LoraReferenceSnapshot, capture_trainable, restore, swap_in


@pytest.fixture
def model():
    return peft_model("linear", seed=2)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_online_snapshot_gives_the_policy_as_it_was(model, mode):
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)  # stands for optimizer steps
    expected_live = logits(model)
    before = fingerprint(model)
    with snap as entered:
        assert entered is snap and snap.active
        assert not torch.is_grad_enabled()
        out = model(TOKENS).logits
        assert not out.requires_grad
        torch.testing.assert_close(out, expected_ref, rtol=0, atol=0)
    assert torch.is_grad_enabled() and not snap.active
    torch.testing.assert_close(logits(model), expected_live, rtol=0, atol=0)
    assert_unchanged(model, before)


def test_snapshot_is_reusable_and_leaves_modes_and_flags_alone(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for _ in range(3):
        with snap:
            pass
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def _policy_step(model, reference=None, *, kl_to=None, use_kl=True):
    """Policy forward, then ``reference()`` in between, then backward of cross-entropy plus a KL
    to the reference logits (``kl_to``, or what ``reference()`` returned); the gradients."""
    model.zero_grad(set_to_none=True)
    policy = model(TOKENS).logits
    between = reference() if reference else None
    target = kl_to if kl_to is not None else between
    loss = F.cross_entropy(policy.reshape(-1, policy.shape[-1]), TOKENS.reshape(-1))
    if use_kl and target is not None:
        log_p, log_ref = policy.log_softmax(-1), target.log_softmax(-1)
        loss = loss + F.kl_div(log_ref, log_p, log_target=True, reduction="batchmean")
    loss.backward()
    return [p.grad.clone() for p in _trainable(model)]


def test_reference_forward_between_policy_forward_and_backward_keeps_gradients_exact(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)

    def reference():
        with snap:
            return model(TOKENS).logits

    ref_first = reference()
    assert not torch.equal(ref_first, logits(model))  # the reference really differs

    plain = _policy_step(model)
    with_ref_between = _policy_step(model, reference, use_kl=False)
    for a, b in zip(plain, with_ref_between, strict=True):
        assert torch.equal(a, b)

    # With a KL term on the reference: the same gradients as taking the reference first.
    expected = _policy_step(model, kl_to=ref_first)
    got = _policy_step(model, reference)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_body_raising_still_restores_keyboard_interrupt_included(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    before = fingerprint(model)
    for exc in (ValueError("in the body"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with snap:
                raise exc
        assert_unchanged(model, before)
        assert torch.is_grad_enabled() and not snap.active


def test_nested_entry_is_refused_and_the_outer_swap_still_restores(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    before = fingerprint(model)
    expected_ref = None
    with pytest.raises(RuntimeError, match="already entered"):
        with snap:
            expected_ref = logits(model)
            with snap:
                pass
    assert expected_ref is not None
    assert_unchanged(model, before)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("outer", ["pointer", "copy"])
def test_two_snapshots_nest_last_in_first_out(model, mode, outer):
    live_out = logits(model)
    first = LoraReferenceSnapshot(model, mode=outer)
    perturb(model, seed=7)
    second = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=8)
    live = logits(model)
    before = fingerprint(model)
    with first:
        with second:
            second_out = logits(model)
        torch.testing.assert_close(logits(model), live_out, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), live, rtol=0, atol=0)
    assert not torch.equal(second_out, live)
    assert_unchanged(model, before)


def test_snapshot_argument_is_copied_and_checked(model):
    captured = capture_trainable(model)
    snap = LoraReferenceSnapshot(model, snapshot=captured)
    name = next(iter(captured))
    captured[name].fill_(123.0)  # the caller's dict changes afterwards; the snapshot must not
    assert not torch.equal(snap.state[name], captured[name])
    assert snap.report is None and len(snap) == len(captured)
    assert "tensors=8" in repr(snap) and "active=False" in repr(snap)

    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"Unexpected key\(s\) in snapshot: 'lm_head\.typo'"):
        LoraReferenceSnapshot(model, snapshot={"lm_head.typo": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"has \(4, 16\) torch.float64, the model has \(4, 16\) torch.float32"
    ):
        LoraReferenceSnapshot(model, snapshot={name: captured[name].double()})
    assert_unchanged(model, before)


def test_swap_in_is_all_or_nothing(model):
    before = fingerprint(model)
    good = capture_trainable(model)
    first, *_, last = good
    bad_cases = [
        (
            {**good, "nope.weight": torch.zeros(1)},
            ValueError,
            r"Unexpected key\(s\) in state: 'nope\.weight'",
        ),
        ({**good, last: torch.zeros(3, 3)}, ValueError, r"shape or dtype mismatch for 1 key"),
        (
            {**good, last: good[last].half()},
            ValueError,
            r"torch.float16, the model has .* torch.float32",
        ),
        ({**good, last: "zeros"}, TypeError, r"values must be Tensors; not for key\(s\) '"),
        ([1, 2], TypeError, r"must be a mapping"),
    ]
    for state, error, match in bad_cases:
        with pytest.raises(error, match=match):
            swap_in(model, state)
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"Unexpected key\(s\) in displaced"):
        restore(model, {"nope": torch.zeros(1)})
    assert_unchanged(model, before)


class _Brittle(torch.nn.Parameter):
    """A parameter whose ``.data`` cannot be re-pointed, as a failing assignment would."""

    @property
    def data(self):
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value):
        raise RuntimeError("simulated failure half way")


def test_a_pointer_swap_failing_half_way_changes_nothing(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    *path, leaf = names[-1].split(".")
    owner = model.get_submodule(".".join(path))
    owner._parameters[leaf] = _Brittle(owner._parameters[leaf].detach().clone())
    state = {n: torch.zeros_like(v) for n, v in capture_trainable(model).items()}
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="simulated failure half way"):
        swap_in(model, state)
    assert_unchanged(model, before)
    snap = LoraReferenceSnapshot(model, snapshot=state)
    with pytest.raises(RuntimeError, match="simulated failure half way"):
        with snap:
            pass
    assert_unchanged(model, before)
    assert not snap.active and torch.is_grad_enabled()


def test_a_copy_swap_failing_half_way_changes_nothing(model, monkeypatch):
    state = {n: torch.zeros_like(v) for n, v in capture_trainable(model).items()}
    snap = LoraReferenceSnapshot(model, snapshot=state, mode="copy")
    real_copy = torch._foreach_copy_
    calls = []

    def copy_half_then_fail(dst, src, **kwargs):
        calls.append(len(dst))
        if len(calls) == 2:  # the first call saves the live values; the second loads the ref
            real_copy(dst[: len(dst) // 2], src[: len(src) // 2])
            raise RuntimeError("simulated failure half way")
        return real_copy(dst, src, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", copy_half_then_fail)
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="simulated failure half way"):
        swap_in(model, state, mode="copy")
    assert_unchanged(model, before)
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated failure half way"):
        with snap:
            pass
    assert_unchanged(model, before)
    assert not snap.active and torch.is_grad_enabled()


def test_copy_mode_keeps_parameter_storage_and_pointer_mode_reads_the_snapshot(model):
    perturb(model, seed=7)
    ptrs = [p.data_ptr() for p in model.parameters()]
    copy, pointer = (LoraReferenceSnapshot(model, mode=m) for m in ("copy", "pointer"))
    with copy:
        assert [p.data_ptr() for p in model.parameters()] == ptrs
    with pointer:
        live = {p.data_ptr() for p in model.parameters() if p.requires_grad}
        assert live == {t.data_ptr() for t in pointer.state.values()}
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert "mode='copy'" in repr(copy)
    with pytest.raises(ValueError, match=r"mode must be one of \('pointer', 'copy'\)"):
        LoraReferenceSnapshot(model, mode="inplace")
    with pytest.raises(ValueError, match="mode must be one of"):
        swap_in(model, capture_trainable(model), mode="fast")


def test_a_snapshot_follows_a_replaced_module_and_refuses_a_changed_dtype(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    expected_ref = logits(model)
    # Replace one LoRA factor by a new module (new parameter objects), as user code might.
    name = next(n for n in snap.state if n.endswith("lora_A.default.weight"))
    owner = model.get_submodule(name.rsplit(".", 2)[0])
    fresh = torch.nn.Linear(owner["default"].in_features, owner["default"].out_features, bias=False)
    owner["default"] = fresh
    perturb(model, seed=7)
    before = fingerprint(model)
    with snap:  # the snapshot binds to the new parameter, not the orphaned one
        torch.testing.assert_close(logits(model), expected_ref, rtol=0, atol=0)
    assert_unchanged(model, before)
    model.to(torch.float64)
    with pytest.raises(ValueError, match="has .* torch.float32, the model has .* torch.float64"):
        with snap:
            pass
    assert not snap.active and torch.is_grad_enabled()


def test_offloaded_parameters_are_named_before_anything_changes():
    model = peft_model("linear", seed=2)
    snap_state = capture_trainable(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    before = fingerprint(model)
    first = r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight'"
    match = first + r".* on the 'meta' device"
    with pytest.raises(ValueError, match=match):
        capture_trainable(model)
    with pytest.raises(ValueError, match=match):
        LoraReferenceSnapshot(model, snapshot=snap_state)
    with pytest.raises(ValueError, match=match):
        swap_in(model, snap_state)
    assert_unchanged(model, before)


def test_a_snapshot_works_for_a_bfloat16_model(mode):
    model = peft_model("linear", seed=2).to(torch.bfloat16)
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model, mode=mode)
    assert all(t.dtype == torch.bfloat16 for t in snap.state.values())
    perturb(model, seed=7)
    with snap:
        torch.testing.assert_close(logits(model), expected_ref, rtol=0, atol=0)
