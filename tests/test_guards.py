"""What real loops do to a swap: autocast, merged or switched adapters, optimizer steps inside
it, several snapshots, threads, tied weights. Each gives the reference or a clear error, and
the live weights are never lost."""

import contextlib
import threading

import peft
import pytest
import torch
from helpers import TOKENS, assert_unchanged, base_model, fingerprint, logits, peft_model, perturb

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    capture_trainable,
    delta_report,
    restore,
    soft_update_,
    swap_in,
    weight_delta,
)


@pytest.fixture
def model():
    return peft_model("linear", seed=2)


def _two_adapters():
    model = peft_model("linear", seed=2)
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model, seed=5)  # only "default" is trainable here
    return model


# --- 1. a swap the forward would not read is refused before anything changes -------------


def test_a_merged_adapter_is_refused_and_works_again_once_unmerged(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    expected_ref = logits(model)
    perturb(model, seed=7)
    model.merge_adapter()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
        with snap:
            pass
    with pytest.raises(ValueError, match="merged"):
        swap_in(model, snap.state, mode=mode)
    assert_unchanged(model, before)
    assert not snap.active and torch.is_grad_enabled()
    model.unmerge_adapter()
    with snap:
        torch.testing.assert_close(logits(model), expected_ref, rtol=0, atol=1e-6)


def test_a_snapshot_of_an_adapter_that_is_no_longer_active_is_refused(mode):
    model = _two_adapters()
    snap = LoraReferenceSnapshot(model, mode=mode)
    model.set_adapter("other")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter 'default', but the forward runs 'other'"):
        with snap:
            pass
    assert_unchanged(model, before)


def test_swapping_inside_disable_adapter_is_refused(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    with model.disable_adapter():
        before = fingerprint(model)
        with pytest.raises(ValueError, match="disabled"):
            with snap:
                pass
        assert_unchanged(model, before)


def test_an_online_snapshot_taken_inside_disable_adapter_is_refused(model):
    with model.disable_adapter():  # peft freezes the adapter in here
        with pytest.raises(ValueError, match="no trainable parameter.*disable_adapter"):
            LoraReferenceSnapshot(model)


def test_from_disk_into_an_adapter_the_forward_does_not_run_is_refused(tmp_path, mode):
    peft_model("linear", seed=3).save_pretrained(tmp_path)
    model = _two_adapters()
    model.set_adapter("other")
    for p in model.parameters():  # "default" loaded and trainable, "other" active
        p.requires_grad_("lora_" in peft_name(p, model) and ".default." in peft_name(p, model))
    with pytest.raises(ValueError, match=r"adapter 'default', but the forward runs 'other'"):
        LoraReferenceSnapshot.from_disk(model, tmp_path, mode=mode)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_from_disk_of_an_adapter_the_forward_does_not_run_is_refused_whatever_its_bias(
    tmp_path, mode, bias
):
    # The adapter's biases belong to no adapter name, so only they would be trainable and
    # read: the reference would be the live policy with the saved biases.
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    saved = peft.get_peft_model(
        base_model(0, attention_bias=True), peft.LoraConfig(**config, bias=bias)
    )
    perturb(saved, seed=3)
    saved.save_pretrained(tmp_path)
    model = peft.get_peft_model(
        base_model(0, attention_bias=True), peft.LoraConfig(**config, bias=bias)
    )
    model.add_adapter("other", peft.LoraConfig(**config))
    model.set_adapter("other")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter 'default', but the forward runs 'other'"):
        LoraReferenceSnapshot.from_disk(model, tmp_path, mode=mode)
    assert_unchanged(model, before)


def peft_name(param, model):
    return next(n for n, p in model.named_parameters() if p is param)


# --- 2. caches keyed on the parameter object -----------------------------------------------


@pytest.mark.parametrize("reference_first", [False, True])
def test_one_autocast_region_gives_each_forward_its_own_weights(model, mode, reference_first):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # each forward alone, as the truth
        policy_alone = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), snap:
        reference_alone = logits(model)
    assert not torch.equal(policy_alone, reference_alone)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if reference_first:
            with snap:
                reference = logits(model)
            policy = model(TOKENS).logits
        else:
            policy = model(TOKENS).logits
            with snap:
                reference = logits(model)
    assert torch.equal(reference, reference_alone)
    assert torch.equal(policy.detach(), policy_alone)


# --- 3. writes while swapped in --------------------------------------------------------------


def test_an_in_place_write_inside_the_swap_is_reported_and_the_weights_come_back(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    reference = {k: v.clone() for k, v in snap.state.items()}
    perturb(model, seed=7)
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match=r"written in place inside `with snap:`"):
        with snap:
            perturb(model, seed=9)  # in the wrong place: onto the reference weights
    assert_unchanged(model, before)
    assert torch.is_grad_enabled() and not snap.active
    if mode == "pointer":  # the step went into the snapshot: refused until re-taken
        with pytest.raises(RuntimeError, match=r"Re-take"), snap:
            pass
        with pytest.raises(RuntimeError, match=r"Re-take"):
            snap.update_(model, 0.5)
        assert_unchanged(model, before)
        snap.refresh(model)
        with snap:
            pass
    else:  # copy mode: the snapshot was never written
        assert all(torch.equal(v, reference[k]) for k, v in snap.state.items())
        with snap:
            pass


def test_a_step_between_swap_in_and_restore_is_reported_and_the_weights_come_back(model, mode):
    state = {k: v.detach().clone() + 1 for k, v in model.named_parameters() if v.requires_grad}
    before = fingerprint(model)
    displaced = swap_in(model, state, mode=mode)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(RuntimeError, match=r"restore: parameter\(s\) .* written in place"):
        restore(model, displaced)
    assert_unchanged(model, before)


# --- 4. one owner of a model's parameters at a time -----------------------------------------


def test_two_snapshots_left_out_of_order_give_the_live_weights_back(model, mode):
    first, second = (LoraReferenceSnapshot(model, mode=mode) for _ in range(2))
    perturb(model, seed=7)
    before = fingerprint(model)
    live = logits(model)
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        first.__exit__(None, None, None)
    assert first.active and second.active
    second.__exit__(None, None, None)
    assert not first.active and not second.active
    assert torch.is_grad_enabled()
    assert_unchanged(model, before)
    assert torch.equal(logits(model), live)


def test_nested_snapshots_in_one_thread_still_work(model, mode):
    outer = LoraReferenceSnapshot(model, mode=mode)
    reference = logits(model)
    perturb(model, seed=7)
    inner = LoraReferenceSnapshot(model, mode=mode)
    live = logits(model)
    with outer:
        with inner:
            assert torch.equal(logits(model), live)
        assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), live)


def test_threads_each_with_a_snapshot_never_see_each_others_weights(model, mode):
    snaps = [LoraReferenceSnapshot(model, mode=mode)]
    expected = [logits(model)]
    perturb(model, seed=7)
    snaps.append(LoraReferenceSnapshot(model, mode=mode))
    expected.append(logits(model))
    perturb(model, seed=8)
    before = fingerprint(model)
    wrong, errors = [], []

    def work(i):
        try:
            for _ in range(15):
                with snaps[i]:
                    if not torch.equal(logits(model), expected[i]):
                        wrong.append(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert_unchanged(model, before)


def test_a_pure_swap_from_another_thread_is_refused_while_a_snapshot_is_entered(model, mode):
    snap = LoraReferenceSnapshot(model, mode=mode)
    state = {k: v.clone() for k, v in snap.state.items()}
    entered, done = threading.Event(), threading.Event()

    def hold():
        with snap:
            entered.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="another thread"):
            swap_in(model, state, mode=mode)
    finally:
        done.set()
        thread.join()


# --- 5. bit-exact means layout too -----------------------------------------------------------


def _tied_model(seed):
    base = base_model(0, tie_word_embeddings=True)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "lm_head", "q_proj"],
        ensure_weight_tying=True,
    )
    model = peft.get_peft_model(base, config)
    perturb(model, seed)
    return model.eval()


def test_tied_embeddings_keep_their_layout_and_the_reference_is_bit_exact(mode):
    model = _tied_model(seed=2)
    params = dict(model.named_parameters())
    transposed = [n for n, p in params.items() if p.requires_grad and not p.is_contiguous()]
    assert transposed, "peft should tie lm_head's LoRA as a transposed view"
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    before = fingerprint(model)
    with snap:
        for name in transposed:
            assert params[name].stride() == before[name][0].stride()
        assert torch.equal(logits(model), expected_ref)
    assert_unchanged(model, before)
    # the pure functions too, with contiguous CPU values
    state = {k: v.contiguous().clone() for k, v in snap.state.items()}
    displaced = swap_in(model, state, mode=mode)
    try:
        assert torch.equal(logits(model), expected_ref)
    finally:
        restore(model, displaced)
    assert_unchanged(model, before)


# --- a failure inside __exit__ ---------------------------------------------------------------


def test_a_failure_on_the_way_out_still_restores(model, mode, monkeypatch):
    from fieldkit.training import _snapshot

    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    before = fingerprint(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.raises(RuntimeError, match="reshard failed"))
        stack.enter_context(snap)

        def fail(modules):
            raise RuntimeError("reshard failed")

        monkeypatch.setattr(_snapshot.sharding, "reshard", fail)
    monkeypatch.undo()
    assert not snap.active and torch.is_grad_enabled()
    assert_unchanged(model, before)
    with snap:  # usable again, and the next entry keeps the live weights too
        pass
    assert_unchanged(model, before)


def test_a_copy_mode_snapshot_first_entered_in_inference_mode_works_outside_it(model):
    snap = LoraReferenceSnapshot(model, mode="copy")
    expected_ref = logits(model)
    perturb(model, seed=7)
    before = fingerprint(model)
    with torch.inference_mode(), snap:  # the stash is allocated here
        assert torch.equal(model(TOKENS).logits, expected_ref)
    with snap:
        assert torch.equal(logits(model), expected_ref)
    assert_unchanged(model, before)
    snap.update_(model, 0.5)


# --- 6. reading the weights while they are swapped ------------------------------------------


def _readers(model, tracker, other, start):
    """Every way to read the live trainable weights: each would read the reference inside."""
    live = lambda: dict(model.named_parameters())  # noqa: E731
    return {
        "WeightDeltaTracker.delta": tracker.delta,
        "WeightDeltaTracker.report": tracker.report,
        "WeightDeltaTracker.reset": tracker.reset,
        "WeightDeltaTracker": lambda: WeightDeltaTracker(model),
        "capture_trainable": lambda: capture_trainable(model),
        "LoraReferenceSnapshot": lambda: LoraReferenceSnapshot(model),
        "LoraReferenceSnapshot.update_": lambda: other.update_(model, 0.5),
        "LoraReferenceSnapshot.refresh": lambda: other.refresh(model),
        "weight_delta": lambda: weight_delta(start, live()),
        "delta_report": lambda: delta_report(start, live()),
        "soft_update_": lambda: soft_update_(dict(other.state), live(), 0.5),
    }


@pytest.mark.parametrize("how", ["snapshot", "swap_in"])
def test_reading_the_weights_while_a_reference_is_swapped_in_is_refused_by_name(model, mode, how):
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    tracker, other = WeightDeltaTracker(model), LoraReferenceSnapshot(model, mode=mode)
    start = {k: v.clone() for k, v in snap.state.items()}
    perturb(model, seed=8)
    expected = tracker.delta(), weight_delta(start, dict(model.named_parameters()))
    kept = {k: v.clone() for k, v in other.state.items()}
    before = fingerprint(model)
    for name, read in _readers(model, tracker, other, start).items():
        with contextlib.ExitStack() as swapped:
            if how == "snapshot":
                swapped.enter_context(snap)
            else:
                displaced = swap_in(model, snap.state, mode=mode)
                swapped.callback(restore, model, displaced)
            with pytest.raises(RuntimeError, match=rf"^{name}: parameter\(s\) .* swapped in by"):
                read()
        assert_unchanged(model, before)
        assert all(torch.equal(v, kept[k]) for k, v in other.state.items()), name
        assert (tracker.delta(), weight_delta(start, dict(model.named_parameters()))) == expected
