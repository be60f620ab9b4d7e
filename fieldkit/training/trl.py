"""TRL's trainers with a :class:`LoraReferenceSnapshot` as their PEFT reference, in one line.

Importing this module imports trl; ``import fieldkit.training`` never does.

With a ``PeftModel`` that already holds an adapter, TRL's ``GRPOTrainer``, ``DPOTrainer``,
``RLOOTrainer`` and ``KTOTrainer`` add a second adapter ``"ref"`` on the device and copy every
parameter whose name contains ``.default.`` into it; names that *end* in the adapter name
(embedding LoRA, trainable tokens) are not copied, so their reference is not the policy's
starting point. Each of these trainers calls ``self.ref_model(...)`` for its reference forward
whenever that attribute is set, checked at call time. :func:`use_snapshot_reference` sets it, on
this trainer only, to a plain callable that runs the trainer's own model inside
``with snapshot:``, and deletes the ``"ref"`` adapter.
"""

from __future__ import annotations

import hashlib
import warnings

from . import missing

try:
    import torch
    import trl
    from torch import nn
except ModuleNotFoundError as e:  # exercised in a subprocess by the import tests
    raise missing("fieldkit.training.trl", e.name or "trl") from None

from ._snapshot import LoraReferenceSnapshot

SUPPORTED_TRL = ((1, 16),)
"""The TRL releases (major, minor) whose reference path this module was read and tested on."""

_TRAINERS = ("GRPOTrainer", "DPOTrainer", "RLOOTrainer", "KTOTrainer")
_PRECOMPUTED = {
    "DPOTrainer": ("ref_chosen_logps", "ref_rejected_logps"),
    "KTOTrainer": ("ref_logps", "ref_KL_logps"),
}
"""The dataset columns where TRL keeps precomputed reference log-probs."""


class SnapshotReference:
    """What :func:`use_snapshot_reference` puts in ``trainer.ref_model``: called as TRL calls
    its reference model, it runs ``model`` with ``snapshot`` swapped in. A plain callable, not
    an ``nn.Module``, so that nothing in TRL walks into it as a second model."""

    def __init__(self, model: nn.Module, snapshot: LoraReferenceSnapshot):
        self.model, self.snapshot = model, snapshot

    def __call__(self, *args, **kwargs):
        with self.snapshot:
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SnapshotReference({self.snapshot!r})"


def use_snapshot_reference(
    trainer: trl.GRPOTrainer | trl.DPOTrainer | trl.RLOOTrainer | trl.KTOTrainer,
    snapshot: LoraReferenceSnapshot | None = None,
) -> LoraReferenceSnapshot | None:
    """Make ``trainer`` compute its reference with ``snapshot``, swapped into its own model.

    Every reference forward TRL makes then runs the policy model inside ``with snapshot:``
    (where TRL runs it: same batching, ``logits_to_keep``, autocast), so there is one adapter
    on the device. The ``"ref"`` adapter TRL added is deleted, and its memory freed. Only this
    trainer changes: no function of TRL or peft is patched.

    Args:
        trainer: a ``trl.GRPOTrainer``, ``DPOTrainer``, ``RLOOTrainer`` or ``KTOTrainer`` over a
            ``peft.PeftModel``, after its ``__init__`` and before ``train()``.
        snapshot: the reference; ``None`` takes an online snapshot of the policy's adapter now
            (TRL's own meaning of the reference for a pre-trained adapter). Any snapshot of
            ``trainer.model``, e.g. ``LoraReferenceSnapshot.from_disk(trainer.model, dir)``.
            With a :class:`~fieldkit.training.hf.ReferenceSyncCallback` on the trainer it is
            a soft (TR-DPO) reference, which TRL refuses for PEFT models.

    With ``precompute_ref_log_probs=True`` (DPO, KTO), TRL has already computed the reference
    log-probs in ``__init__``, its own way; they are computed again here, through TRL's own
    precompute (same batches, collator and cache, keyed to this snapshot), for the train and
    eval datasets, and ``evaluate()`` on a new eval dataset computes them the same way. Where
    TRL makes no reference forward at all (``beta=0`` for GRPO and RLOO, the default of TRL
    1.16's GRPO), nothing is attached: a ``UserWarning`` names the trainer and the option,
    training runs as TRL's own would, and ``None`` is returned.

    Returns:
        The snapshot in use, or ``None`` where the trainer uses no reference.

    Raises:
        TypeError: a model that is not a ``peft.PeftModel``, a trainer type this does not know,
            or a snapshot of another model.
        ValueError: a ``ref_model`` already given to the trainer, or precomputed log-probs
            under DeepSpeed (TRL computes them through an inference engine of its own, before
            DeepSpeed prepares the model, which a swap into the model would not reach).
        RuntimeError: a TRL release other than the ones in ``SUPPORTED_TRL``.

    >>> callable(use_snapshot_reference)
    True
    """
    fn = "use_snapshot_reference"
    version = tuple(int(x) for x in trl.__version__.split(".")[:2])
    if version not in SUPPORTED_TRL:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRL)
        raise RuntimeError(
            f"{fn}: TRL {trl.__version__} is not a release whose reference path fieldkit knows "
            f"(supported: {supported}). Install one of those, or check that this release still "
            "calls `self.ref_model(...)` for the reference forward, and add it."
        )
    kind = next((t for t in _TRAINERS if isinstance(trainer, getattr(trl, t))), None)
    if kind is None:
        raise TypeError(
            f"{fn}: {type(trainer).__name__} is not a trainer whose reference path fieldkit "
            f"knows ({', '.join(_TRAINERS)}). Trainers that generate from the reference cannot "
            "use a swapped one: a swap serves log-probs, not .generate()."
        )
    model = trainer.model
    import peft

    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{fn}: the trainer's model is a {type(model).__name__}, not a peft.PeftModel; a "
            "LoRA snapshot reference needs the adapter on a PeftModel."
        )
    args = trainer.args
    if kind in ("GRPOTrainer", "RLOOTrainer") and getattr(args, "beta", None) == 0.0:
        warnings.warn(
            f"{fn}: {kind} with beta=0 makes no reference forward, so no snapshot is attached "
            "and the trainer is left as TRL made it.",
            UserWarning,
            stacklevel=2,
        )
        return None
    precompute = kind in _PRECOMPUTED and getattr(args, "precompute_ref_log_probs", False)
    if precompute and trainer.is_deepspeed_enabled:
        raise ValueError(
            f"{fn}: precompute_ref_log_probs=True under DeepSpeed: {kind} computes the reference "
            "log-probs through a DeepSpeed inference engine of its own, before DeepSpeed "
            "prepares the model, which a snapshot swapped into the model would not reach. Set "
            "it to False (the snapshot then serves each reference forward during training)."
        )
    current = trainer.ref_model
    if current is not None and not isinstance(current, SnapshotReference):
        raise ValueError(
            f"{fn}: the trainer already has a ref_model ({type(current).__name__}); a snapshot "
            "replaces the PEFT reference that TRL builds when it is given none."
        )
    if snapshot is not None and snapshot._model is not model:
        raise TypeError(
            f"{fn}: the snapshot belongs to another model; take it of trainer.model, e.g. "
            "LoraReferenceSnapshot.from_disk(trainer.model, adapter_dir)."
        )
    if "ref" in model.peft_config and model.active_adapters != ["ref"]:
        model.delete_adapter("ref")  # TRL's copy: one adapter on the device from here on
    if snapshot is None:
        snapshot = LoraReferenceSnapshot(model)
    trainer.ref_model = SnapshotReference(model, snapshot)
    if precompute:
        _precompute_again(trainer, kind, snapshot)
    return snapshot


def _precompute_again(trainer, kind: str, snapshot: LoraReferenceSnapshot) -> None:
    """Replace the reference log-probs TRL precomputed in ``__init__`` with the snapshot's,
    through TRL's own ``_precompute_ref_logps`` (which runs ``trainer.ref_model``, now the
    snapshot), its cache keyed to the snapshot's bytes so that TRL's own values are not reused."""
    from datasets.fingerprint import Hasher

    trainer._precompute_model_hash = Hasher.hash(
        (trainer._precompute_model_hash, "fieldkit", _digest(snapshot))
    )
    args, columns = trainer.args, _PRECOMPUTED[kind]

    def again(dataset, name: str, batch_size: int):
        dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
        return trainer._precompute_ref_logps(dataset, name, batch_size)

    batch = args.precompute_ref_batch_size
    trainer.train_dataset = again(
        trainer.train_dataset, "train", batch or args.per_device_train_batch_size
    )
    evals, size = trainer.eval_dataset, batch or args.per_device_eval_batch_size
    if isinstance(evals, dict):
        trainer.eval_dataset = {name: again(d, name, size) for name, d in evals.items()}
    elif evals is not None:
        trainer.eval_dataset = again(evals, "eval", size)


def _digest(snapshot: LoraReferenceSnapshot) -> str:
    """A hash of the snapshot's names and bytes."""
    h = hashlib.sha256()
    for name, value in snapshot.state.items():
        h.update(name.encode())
        h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
