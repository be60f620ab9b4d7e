"""The Trainer callbacks, in real transformers.Trainer runs on a tiny peft model (CPU)."""

import math
import warnings

import pytest
import torch
import transformers
from helpers import VOCAB, peft_model

from fieldkit.training import LoraReferenceSnapshot, capture_trainable, weight_delta
from fieldkit.training.hf import PREFIX, ReferenceSyncCallback, WeightDeltaCallback

KEYS = ["l2", "max_abs", "l2_since_start", "max_abs_since_start", "unmoved_tensors"]


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, 8), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def _trainer(tmp_path, model, callbacks, lr=1e-2, steps=4, **options):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **{"save_strategy": "no", **options},
    )
    return transformers.Trainer(
        model=model.train(), args=args, train_dataset=_data(), callbacks=callbacks
    )


class _Captures(transformers.TrainerCallback):
    """Copies of the trainable weights at the start and at every training log, by hand."""

    def __init__(self):
        self.states, self.logs = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states.append(capture_trainable(model))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "loss" in logs:
            self.states.append(capture_trainable(model))
            self.logs.append(dict(logs))


def test_figures_reach_log_history_and_match_a_hand_computation(tmp_path):
    captures = _Captures()
    trainer = _trainer(tmp_path, peft_model("linear", seed=2), [WeightDeltaCallback(), captures])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every step moves: no warning
        trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 4
    states = captures.states
    for i, entry in enumerate(history, start=1):
        assert all(f"weight_delta/{k}" in entry for k in KEYS), entry
        assert captures.logs[i - 1]["weight_delta/l2"] == entry["weight_delta/l2"]  # in logs too
        since_log = weight_delta(states[i - 1], states[i])
        since_start = weight_delta(states[0], states[i])
        assert math.isclose(entry["weight_delta/l2"], since_log[0], rel_tol=1e-5)
        assert math.isclose(entry["weight_delta/max_abs"], since_log[1], rel_tol=1e-6)
        assert math.isclose(entry["weight_delta/l2_since_start"], since_start[0], rel_tol=1e-6)
        assert entry["weight_delta/max_abs_since_start"] == since_start[1]
        assert entry["weight_delta/unmoved_tensors"] == 0
    (summary,) = [h for h in trainer.state.log_history if "train_runtime" in h]
    assert not any(k.startswith("weight_delta/") for k in summary)  # no "0 moved" after a run


def test_learning_rate_zero_warns_once_and_names_the_cause(tmp_path):
    trainer = _trainer(tmp_path, peft_model("linear", seed=2), [WeightDeltaCallback()], lr=0.0)
    with pytest.warns(UserWarning, match="optimizer step 1 moved none of the 8") as record:
        trainer.train()
    ours = [w for w in record if "WeightDeltaCallback" in str(w.message)]
    assert len(ours) == 1
    assert "learning rate 0" in str(ours[0].message)
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["weight_delta/unmoved_tensors"] == 8 and last["weight_delta/l2_since_start"] == 0


def test_install_puts_the_callback_before_the_reporters(tmp_path):
    reporter = _Captures()
    trainer = _trainer(tmp_path, peft_model("linear", seed=2), [reporter], steps=2)
    callback = WeightDeltaCallback(check_steps=False).install(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    assert (
        callback.install(trainer) is callback
        and trainer.callback_handler.callbacks.count(callback) == 1
    )
    trainer.train()
    assert all("weight_delta/l2" in logs for logs in reporter.logs)


def test_reference_sync_callback_mixes_the_policy_in_every_n_steps(tmp_path):
    model = peft_model("linear", seed=2)
    snap = LoraReferenceSnapshot(model)
    expected = {n: v.double().clone() for n, v in snap.state.items()}

    class _Policy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % 2 == 0:
                live = capture_trainable(model)
                for n in expected:
                    expected[n] = 0.5 * expected[n] + 0.5 * live[n].double()

    trainer = _trainer(
        tmp_path, model, [ReferenceSyncCallback(snap, alpha=0.5, every=2), _Policy()]
    )
    trainer.train()
    for n, v in snap.state.items():
        torch.testing.assert_close(v.double(), expected[n], rtol=1e-6, atol=1e-7)
    # alpha=1 every step: the reference is the final policy, exactly.
    sync = ReferenceSyncCallback(snap, alpha=1.0, every=1)
    _trainer(tmp_path, model, [sync], steps=1).train()
    final = capture_trainable(model)
    assert all(torch.equal(v, final[n]) for n, v in snap.state.items())


def test_reference_sync_callback_checks_its_arguments():
    snap = LoraReferenceSnapshot(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="alpha must be in"):
        ReferenceSyncCallback(snap, alpha=2.0, every=1)
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            ReferenceSyncCallback(snap, alpha=0.5, every=every)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_both_callbacks_save_and_resume_bit_exactly_under_an_engine_on_two_ranks(tmp_path, engine):
    """A real Trainer on two gloo ranks, the snapshot taken before train() (the model is
    sharded inside it): checkpoints save on every engine (under ZeRO-3 and FSDP2 a collective),
    and a run resumed from step 2 logs the same delta figures and holds the same soft
    reference at steps 3 and 4 as the run that never stopped, on both ranks, bit for bit."""
    import importlib.util
    from pathlib import Path

    from test_distributed import _run

    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    worker = Path(__file__).with_name("trainer_worker.py")
    ranks = _run(engine, tmp_path, timeout=600, worker=worker)
    if "skip" in ranks[0]["whole"]:
        pytest.skip(ranks[0]["whole"]["skip"])
    for rank in ranks:
        whole, resumed = rank["whole"], rank["resumed"]
        assert (whole["sharded"] > 0) is (engine != "zero2"), "the engine did not shard"
        assert sorted(resumed["logs"]) == sorted(whole["logs"]) == ["1", "2", "3", "4"]
        for step in ("3", "4"):
            assert resumed["logs"][step] == whole["logs"][step], step
            assert resumed["references"][step] == whole["references"][step], step
        assert whole["logs"]["4"][f"{PREFIX}l2_since_start"] > 0
    assert ranks[0]["whole"]["logs"] == ranks[1]["whole"]["logs"]  # global figures


def test_check_steps_tells_a_skipped_step_from_a_tensor_that_does_not_move(tmp_path):
    """accelerate's optimizer says when it skipped a step (an fp16 overflow, DeepSpeed's too):
    the callback says so once and stays armed, and the next step taken that moves nothing is
    still caught."""
    from accelerate import Accelerator

    model = peft_model("linear", seed=2)
    optimizer = Accelerator(cpu=True).prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = WeightDeltaCallback()
    callback.on_train_begin(args, state, control, model=model)
    optimizer._is_overflow = True  # what accelerate records for a skipped step
    assert optimizer.step_was_skipped
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.on_optimizer_step(args, state, control, optimizer=optimizer)
        said = [str(w.message) for w in caught]
        assert all("was skipped" in m for m in said) and len(said) == (1 if _ == 0 else 0), said
    optimizer._is_overflow = False  # a step taken that moved nothing: still caught
    with pytest.warns(UserWarning, match="moved none"):
        callback.on_optimizer_step(args, state, control, optimizer=optimizer)
