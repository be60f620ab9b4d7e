"""Writes into swapped parameters that autograd's version counters cannot see: an optimizer
step (fused ones move no counter), writes through ``.data``; and exits in any order."""

import contextlib

import pytest
import torch
from helpers import TOKENS, assert_unchanged, fingerprint, logits, peft_model, perturb

from fieldkit.training import LoraReferenceSnapshot, restore, swap_in


@pytest.fixture
def model():
    return peft_model("linear", seed=2)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


# Every torch.optim optimizer, in each implementation it offers on the CPU; lr=0 is refused too.
OPTIMIZERS = {
    "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "AdamW(foreach=False)": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "Adam(fused=True, lr=0)": lambda ps: torch.optim.Adam(ps, lr=0.0, fused=True),
    "SGD(fused=True)": lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True),
    "SGD(foreach=False)": lambda ps: torch.optim.SGD(ps, lr=0.5, foreach=False),
    "Adagrad(fused=True)": lambda ps: torch.optim.Adagrad(ps, lr=0.5, fused=True),
    **{
        name: (lambda cls: lambda ps: cls(ps))(getattr(torch.optim, name))
        for name in ("Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "LBFGS")
    },
}


def _state(optimizer) -> list:
    """The optimizer's state, flattened: (param index, key, value) with tensors cloned."""
    return [
        (i, k, v.clone() if torch.is_tensor(v) else v)
        for i, per in optimizer.state_dict()["state"].items()
        for k, v in sorted(per.items())
    ]


def _same_state(a, b) -> bool:
    return len(a) == len(b) and all(
        x[:2] == y[:2] and (torch.equal(x[2], y[2]) if torch.is_tensor(x[2]) else x[2] == y[2])
        for x, y in zip(a, b, strict=True)
    )


def _step(optimizer, model):
    def closure():
        optimizer.zero_grad()
        loss = model(TOKENS).logits.square().mean()
        loss.backward()
        return loss

    return optimizer.step(closure)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_an_optimizer_step_inside_the_swap_is_refused_before_it_writes(model, mode, make):
    snap = LoraReferenceSnapshot(model, mode=mode)
    reference = logits(model)
    held = {k: v.clone() for k, v in snap.state.items()}
    perturb(model, seed=7)
    optimizer = make(_params(model))
    model(TOKENS).logits.square().mean().backward()
    before, state = fingerprint(model), _state(optimizer)
    with pytest.raises(RuntimeError, match=r"step\(\): .* swapped .*LoraReferenceSnapshot") as e:
        with snap:
            _step(optimizer, model)
    assert "Nothing was written" in str(e.value)
    assert_unchanged(model, before)
    assert _same_state(_state(optimizer), state), "the step ran: the optimizer's state moved"
    assert all(torch.equal(v, held[k]) for k, v in snap.state.items())
    with snap:  # still usable, and still the reference
        assert torch.equal(logits(model), reference)
    live = [p.detach().clone() for p in _params(model)]
    _step(optimizer, model)  # outside the swap the same optimizer steps as usual
    moved = any(not torch.equal(a, p) for a, p in zip(live, _params(model), strict=True))
    assert moved or "lr: 0.0" in str(optimizer)


def test_an_optimizer_step_between_swap_in_and_restore_is_refused(model, mode):
    optimizer = torch.optim.AdamW(_params(model), lr=1e-2, fused=True)
    state = {k: v.detach() + 1 for k, v in model.named_parameters() if v.requires_grad}
    before = fingerprint(model)
    displaced = swap_in(model, state, mode=mode)
    with pytest.raises(RuntimeError, match=r"swapped in by swap_in.*restore"):
        _step(optimizer, model)
    restore(model, displaced)
    assert_unchanged(model, before)
    _step(optimizer, model)


def test_an_optimizer_of_another_model_steps_while_a_snapshot_is_entered(model):
    other = peft_model("linear", seed=3)
    optimizer = torch.optim.AdamW(_params(other), lr=1e-2, fused=True)
    with LoraReferenceSnapshot(model):
        _step(optimizer, other)
    assert optimizer.state


# --- writes through .data: invisible to the guards unless check_writes=True ----------------


def _write_data(model):
    torch.manual_seed(0)
    p = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
    p.data.add_(torch.randn_like(p))


def test_a_write_through_data_does_what_the_docs_say_without_the_check(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    held = {k: v.clone() for k, v in snap.state.items()}
    before = fingerprint(model)
    with snap:
        _write_data(model)
    assert_unchanged(model, before)  # the live weights are back either way
    same = all(torch.equal(v, held[k]) for k, v in snap.state.items())
    # CPU, pointer mode: the write went into the snapshot itself; copy mode: thrown away.
    assert same is (mode == "copy")


def test_check_writes_catches_a_write_through_data_and_names_it(model, mode, tmp_path):
    snap = LoraReferenceSnapshot(model, mode=mode, check_writes=True)
    reference = logits(model)
    perturb(model, seed=7)
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match=r"changed inside `with snap:`.*\.data.*lora_A"):
        with snap:
            _write_data(model)
    assert_unchanged(model, before)
    if mode == "pointer":  # the write went into the snapshot: refused until re-taken
        with pytest.raises(RuntimeError, match="Re-take"), snap:
            pass
        snap.refresh(model)
    else:
        with snap:
            assert torch.equal(logits(model), reference)
    peft_model("linear", seed=2).save_pretrained(tmp_path)
    from_disk = LoraReferenceSnapshot.from_disk(model, tmp_path, mode=mode, check_writes=True)
    with from_disk:  # a clean reference forward passes the check
        assert torch.equal(logits(model), reference)


# --- exits, in any order, never raise an internal error --------------------------------------


def test_an_exit_after_the_last_is_a_no_op_in_any_order(model, mode):
    first, second = (LoraReferenceSnapshot(model, mode=mode) for _ in range(2))
    perturb(model, seed=7)
    before = fingerprint(model)
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        first.__exit__(None, None, None)
    first.__exit__(None, None, None)  # its exit is already recorded: nothing more to do
    assert first.active and second.active
    second.__exit__(None, None, None)
    for snap in (first, second, first):
        snap.__exit__(None, None, None)
    assert not first.active and not second.active and torch.is_grad_enabled()
    assert_unchanged(model, before)
    with first, second:
        pass
    assert_unchanged(model, before)


def test_exit_stack_unwinding_after_an_error_gives_the_live_weights_back(model, mode):
    first, second = (LoraReferenceSnapshot(model, mode=mode) for _ in range(2))
    perturb(model, seed=7)
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="out of order"):
        with contextlib.ExitStack() as stack:
            stack.enter_context(first)
            stack.enter_context(second)
            first.__exit__(None, None, None)  # in the wrong place; the stack then unwinds
    assert not first.active and not second.active and torch.is_grad_enabled()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="boom"):
        with contextlib.ExitStack() as stack:
            stack.enter_context(first)
            stack.enter_context(second)
            raise ValueError("boom")
    assert_unchanged(model, before)


def test_an_exit_without_an_entry_is_a_clear_error(model):
    snap = LoraReferenceSnapshot(model)
    with pytest.raises(RuntimeError, match="never entered"):
        snap.__exit__(None, None, None)
