"""Nothing lost across save and resume: a reference saved as a peft adapter, trackers that
survive a restart, Trainer checkpoints that carry both."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import peft
import pytest
import torch
import transformers
from helpers import VARIANTS, base_model, bits, logits, peft_model, perturb

from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker
from fieldkit.training.hf import ReferenceSyncCallback, WeightDeltaCallback


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_saved_reference_is_a_peft_adapter_that_gives_its_logits_bit_for_bit(tmp_path, variant):
    model = peft_model(variant, seed=2)
    snap = LoraReferenceSnapshot(model)
    expected = logits(model)
    perturb(model, seed=7)
    snap.update_(model, 0.25)  # a soft-updated reference: it lives only in memory until saved
    with snap:
        expected = logits(model)
    path = snap.save_pretrained(tmp_path / "ref")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(base_model(0, **VARIANTS[variant][1]), path).eval()
    assert torch.equal(logits(loaded), expected)  # peft itself reads it
    again = LoraReferenceSnapshot.from_disk(peft_model(variant, seed=5), path, strict=True)
    assert _same_state(again.state, snap.state)


def test_a_non_default_adapter_name_round_trips(tmp_path):
    model = peft_model("embedding", seed=2, adapter_name="policy")
    snap = LoraReferenceSnapshot(model)
    with snap:
        expected = logits(model)
    path = snap.save_pretrained(tmp_path / "ref")
    loaded = peft.PeftModel.from_pretrained(base_model(0), path).eval()
    assert torch.equal(logits(loaded), expected)
    live = peft_model("embedding", seed=4, adapter_name="policy")
    again = LoraReferenceSnapshot.from_disk(live, path, adapter_name="policy", strict=True)
    assert _same_state(again.state, snap.state)


def test_a_model_that_is_not_a_peft_model_gets_a_plain_file_read_back(tmp_path):
    layer = torch.nn.Linear(3, 2)
    snap = LoraReferenceSnapshot(layer)
    path = snap.save_pretrained(tmp_path / "ref")
    assert os.listdir(path) == ["reference.safetensors"]
    other = torch.nn.Linear(3, 2)
    again = LoraReferenceSnapshot.from_disk(other, path, strict=True)
    assert _same_state(again.state, snap.state) and again.report.loaded == ("bias", "weight")


def test_saving_is_refused_while_entered_and_is_atomic(tmp_path, monkeypatch):
    model = peft_model("linear", seed=2)
    snap = LoraReferenceSnapshot(model)
    with snap, pytest.raises(RuntimeError, match="entered"):
        snap.save_pretrained(tmp_path / "ref")
    assert not (tmp_path / "ref").exists()
    good = snap.save_pretrained(tmp_path / "ref")
    before = {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)}
    perturb(model, seed=9)
    snap.refresh(model)

    def crash(self, directory, **kwargs):
        raise OSError("disk full")  # after the weights, before the config

    monkeypatch.setattr(peft.LoraConfig, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        snap.save_pretrained(tmp_path / "ref")
    assert sorted(os.listdir(tmp_path)) == ["ref"]  # no half-written directory left behind
    assert {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)} == before


def test_pickling_is_refused_and_points_to_save_pretrained():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(LoraReferenceSnapshot(model))
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(WeightDeltaTracker(model))


def test_a_tracker_restored_after_a_restart_measures_from_the_real_start(tmp_path):
    model = torch.nn.Linear(4, 2)
    tracker = WeightDeltaTracker(model)
    saved = tracker.state_dict()
    with torch.no_grad():
        model.weight.add_(0.5)
    expected = tracker.delta()
    restarted = WeightDeltaTracker(model)  # a new process: its start would be "now"
    assert restarted.delta() == (0.0, 0.0)
    restarted.load_state_dict(saved)
    assert restarted.delta() == expected
    with pytest.raises(ValueError, match=r"Missing key\(s\): 'bias'"):
        restarted.load_state_dict({"weight": saved["weight"]})


def test_the_cli_reads_a_saved_reference(tmp_path):
    snap = LoraReferenceSnapshot(peft_model("linear", seed=2))
    path = snap.save_pretrained(tmp_path / "ref")
    run = [sys.executable, "-m", "fieldkit.training"]
    done = subprocess.run([*run, "inspect", path, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["tensors"]) == len(snap)
    done = subprocess.run([*run, "diff", path, path, "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["compared"] == len(snap)


# --- Trainer checkpoints -----------------------------------------------------------------


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def _run(output_dir, resume=None, steps=6, **options):
    """A Trainer with both callbacks, a soft reference update every 2 steps and a checkpoint
    every 2 steps; returns the reference's final state and the logged figures."""
    model = peft_model("linear", seed=2).train()
    snap = LoraReferenceSnapshot(model)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **options,
    )
    callbacks = [WeightDeltaCallback(), ReferenceSyncCallback(snap, alpha=0.5, every=2)]
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(), callbacks=callbacks
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train(resume_from_checkpoint=resume)
    figures = {
        h["step"]: {k: v for k, v in h.items() if k.startswith("weight_delta/")}
        for h in trainer.state.log_history
        if "loss" in h
    }
    return {k: v.clone() for k, v in snap.state.items()}, figures


def test_a_resumed_run_ends_with_the_same_reference_and_figures_as_an_uninterrupted_one(
    tmp_path,
):
    whole_state, whole = _run(tmp_path / "whole")
    first_state, _ = _run(tmp_path / "cut", steps=4)  # "crashes" after checkpoint-4
    assert (tmp_path / "cut" / "checkpoint-4" / "fieldkit" / "reference").is_dir()
    resumed_state, resumed = _run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-4"))
    assert _same_state(resumed_state, whole_state)
    for step in (5, 6):
        assert resumed[step] == whole[step], step  # since_start from the real start
    assert not _same_state(first_state, whole_state)


def test_rotation_and_save_only_model_keep_fieldkit_state_in_each_checkpoint(tmp_path):
    _run(tmp_path / "out", steps=6, save_total_limit=1, save_only_model=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-6"]
    saved = tmp_path / "out" / "checkpoint-6" / "fieldkit"
    assert sorted(os.listdir(saved)) == ["reference", "weight_delta.safetensors"]


def test_a_checkpoint_without_fieldkit_state_resumes_with_a_warning(tmp_path):
    _run(tmp_path / "old", steps=2)
    shutil.rmtree(tmp_path / "old" / "checkpoint-2" / "fieldkit")  # as an older run saved it
    with pytest.warns(UserWarning, match="starts afresh from here"):
        _run(tmp_path / "old", resume=str(tmp_path / "old" / "checkpoint-2"), steps=4)


def test_ranks_saving_one_reference_at_once_never_collide(tmp_path):
    """Replicated training (DDP, ZeRO-1/2): every rank may call save_pretrained into the same
    directory. Writers on one machine take turns; the directory always holds a whole adapter."""
    import threading

    model = peft_model("linear", seed=2)
    snap = LoraReferenceSnapshot(model)
    errors = []

    def save():
        try:
            for _ in range(15):
                snap.save_pretrained(tmp_path / "ref")
        except Exception as e:  # noqa: BLE001 - any collision is the failure
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    again = LoraReferenceSnapshot.from_disk(model, tmp_path / "ref", strict=True)
    assert all(torch.equal(again.state[n], v) for n, v in snap.state.items())
