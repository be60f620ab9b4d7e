"""``transformers.Trainer`` callbacks (TRL's trainers subclass it, so they work there too).

Importing this module imports transformers; ``import fieldkit.training`` never does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from . import missing

try:
    from torch import nn
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ModuleNotFoundError as e:  # exercised in a subprocess by the import tests
    raise missing("fieldkit.training.hf", e.name or "torch") from None

from . import _sharding as sharding
from ._adapter import read_adapter
from ._buffers import host_empty
from ._checks import check_alpha
from ._format import PEFT_FILE
from ._snapshot import LoraReferenceSnapshot
from ._state import soft_update_
from ._tracker import WeightDeltaTracker

PREFIX = "weight_delta/"


class WeightDeltaCallback(TrainerCallback):
    """Log how far the trainable weights moved, and warn once when an optimizer step moved none.

    On every training log it adds, to the logs and to ``trainer.state.log_history``:

    - ``weight_delta/l2``, ``weight_delta/max_abs``: since the previous training log;
    - ``weight_delta/l2_since_start``, ``weight_delta/max_abs_since_start``: since training
      began;
    - ``weight_delta/unmoved_tensors``: how many trainable tensors did not move since the
      previous training log.

    After each optimizer step it checks that step moved something; the first step that moved
    nothing raises a ``UserWarning`` carrying :meth:`WeightDeltaTracker.report`'s diagnosis
    (learning rate 0, frozen, rounded away, ...). Set ``check_steps=False`` to skip that check
    (it costs one delta and one copy of the adapter per step until it fires).

    It holds one CPU copy of the trainable weights per question it answers exactly (pinned
    where they live on CUDA): since the start, since the last log and, with ``check_steps``,
    since the last optimizer step.

    Trainer runs the callbacks in order and puts those of ``report_to`` first; to have them log
    these figures too, put this callback first: ``WeightDeltaCallback().install(trainer)``.

    Each checkpoint Trainer saves carries the starting points (``fieldkit/weight_delta.
    safetensors``), and training resumed from it measures from them again, so the
    ``*_since_start`` figures go on from the real start.

    >>> callback = WeightDeltaCallback()     # Trainer(..., callbacks=[callback])
    """

    def __init__(self, *, check_steps: bool = True):
        self.check_steps = check_steps
        self._start: WeightDeltaTracker | None = None
        self._since_log: WeightDeltaTracker | None = None
        self._since_step: WeightDeltaTracker | None = None
        self._resumed = False
        self._told_skip = False

    def on_save(self, args, state, control, **kwargs):
        if self._start is None:
            return
        # Whole tensors, gathered by every rank where the model is sharded; cut to each rank's
        # pieces again at resume (on any number of ranks).
        if args.should_save or _sharded(self._start._model):
            from safetensors.torch import save_file

            tensors = {
                f"{part}/{n}": v
                for part, tracker in self._saved_trackers()
                for n, v in tracker.state_dict(whole=True).items()
            }
            if args.should_save:
                path = _fieldkit_dir(args, state, make=True) / "weight_delta.safetensors"
                save_file(tensors, path)

    def on_step_begin(self, args, state, control, **kwargs):
        # Trainer loads a resumed run's state after on_train_begin: the first step knows it.
        if self._resumed or self._start is None:
            return
        self._resumed = True
        path = _resumed_from(args, state, "weight_delta.safetensors", "WeightDeltaCallback")
        if path is not None:
            from safetensors.torch import load_file

            saved = load_file(path)
            for part, tracker in self._saved_trackers():
                prefix = f"{part}/"
                tracker.load_state_dict(
                    {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
                )

    def _saved_trackers(self) -> tuple[tuple[str, WeightDeltaTracker], ...]:
        """What a checkpoint carries, by the prefix of its keys in the file."""
        return (("start", self._start), ("since_log", self._since_log))

    def install(self, trainer) -> WeightDeltaCallback:
        """Put this callback first in ``trainer``'s list, before the reporters, and return it."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model: nn.Module = None, **kwargs):
        self._resumed = False  # each train() call may resume from a checkpoint
        self._start = WeightDeltaTracker(model)
        self._since_log = WeightDeltaTracker(model)
        self._since_step = WeightDeltaTracker(model) if self.check_steps else None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        tracker = self._since_step
        if tracker is None or not len(tracker):
            return
        # accelerate's optimizer (DeepSpeed's too) says when it skipped a step on an fp16
        # overflow: nothing moved, rightly. Say so once; the check waits for a real step.
        if getattr(optimizer, "step_was_skipped", False):
            if not self._told_skip:
                self._told_skip = True
                warnings.warn(
                    f"WeightDeltaCallback: optimizer step {state.global_step + 1} was skipped "
                    "(a gradient overflow under fp16 loss scaling, common in the first steps); "
                    "skipped steps are not checked, and the check stays armed for the next "
                    "step that is taken.",
                    UserWarning,
                    stacklevel=2,
                )
            return
        _, max_abs = tracker.delta()
        if max_abs == 0.0:
            warnings.warn(
                f"WeightDeltaCallback: optimizer step {state.global_step + 1} moved none of the "
                f"{len(tracker)} trainable tensors (a step the optimizer skipped without "
                f"saying so would read the same). {tracker.report().diagnosis()}",
                UserWarning,
                stacklevel=2,
            )
            self._since_step = None  # once
        else:
            tracker.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._start is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        if "train_runtime" in logs:  # Trainer's end-of-run summary, not a training log:
            return  # "since the previous log" would be nothing, and read as "did not move"
        report = self._since_log.report()
        l2_total, max_total = self._start.delta()
        figures = {
            f"{PREFIX}l2": report.l2,
            f"{PREFIX}max_abs": report.max_abs,
            f"{PREFIX}l2_since_start": l2_total,
            f"{PREFIX}max_abs_since_start": max_total,
            f"{PREFIX}unmoved_tensors": len(report.unmoved),
        }
        logs.update(figures)
        # Trainer appended a copy of the logs to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        self._since_log.reset()


class ReferenceSyncCallback(TrainerCallback):
    """Soft (or hard) reference updates for a :class:`LoraReferenceSnapshot` during training:
    every ``every`` optimizer steps, ``ref ← (1 − alpha)·ref + alpha·policy``.

    The PEFT counterpart of TRL's ``sync_ref_model`` (``ref_model_mixup_alpha`` =
    ``alpha``, ``ref_model_sync_steps`` = ``every``), which raises ``NotImplementedError`` for
    PEFT models. ``alpha=1`` re-takes the snapshot (a hard sync).

    >>> import torch
    >>> snap = LoraReferenceSnapshot(torch.nn.Linear(2, 2))
    >>> callback = ReferenceSyncCallback(snap, alpha=0.6, every=512)
    """

    def __init__(self, snapshot: LoraReferenceSnapshot, *, alpha: float, every: int):
        check_alpha("ReferenceSyncCallback", alpha)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ReferenceSyncCallback: every must be an int >= 1, got {every!r}")
        self.snapshot, self.alpha, self.every = snapshot, alpha, every
        self._resumed = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._resumed = False  # each train() call may resume from a checkpoint

    def on_step_end(self, args, state, control, model: nn.Module = None, **kwargs):
        if state.global_step % self.every == 0:
            self.snapshot.update_(model, self.alpha)

    def on_save(self, args, state, control, **kwargs):
        # A collective where the model is sharded (every rank gathers, rank 0 writes).
        if args.should_save or _sharded(self.snapshot._model):
            self.snapshot.save_pretrained(_fieldkit_dir(args, state) / "reference")

    def on_step_begin(self, args, state, control, model: nn.Module = None, **kwargs):
        # Trainer loads a resumed run's state after on_train_begin: the first step knows it.
        if self._resumed:
            return
        self._resumed = True
        path = _resumed_from(args, state, "reference", "ReferenceSyncCallback")
        if path is not None:
            self.snapshot._rebound()  # taken before train(): cut to this rank's pieces first
            # Read unpinned (no second pinned adapter) and written in place, bit for bit, through
            # the write path that waits for copies still reading the snapshot.
            saved, _, _ = read_adapter(
                self.snapshot._model,
                path,
                adapter_name="default",
                weights_filename=PEFT_FILE,
                strict=True,
                into=lambda likes: [host_empty(like, pin=False) for like in likes],
            )
            soft_update_(self.snapshot.state, saved, 1.0)


def _sharded(model: nn.Module) -> bool:
    """Whether saving ``model``'s state is a collective (FSDP2, ZeRO-3 pieces on each rank)."""
    return any(map(sharding.is_sharded, model.parameters()))


def _fieldkit_dir(args, state, *, make: bool = False) -> Path:
    """Where fieldkit's state sits in the checkpoint of ``state.global_step``."""
    path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / "fieldkit"
    if make:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _resumed_from(args, state, name: str, who: str) -> Path | None:
    """The saved state ``name`` of the checkpoint this run resumed from; None on a fresh run,
    and None with a warning for a checkpoint that has none (an older run's)."""
    if state.global_step == 0:
        return None
    path = _fieldkit_dir(args, state) / name
    if path.exists():
        return path
    warnings.warn(
        f"{who}: training resumed at step {state.global_step}, but {str(path)!r} does not exist "
        "(a checkpoint saved without fieldkit's state, or resumed from elsewhere than "
        "output_dir): its state starts afresh from here.",
        UserWarning,
        stacklevel=2,
    )
    return None
