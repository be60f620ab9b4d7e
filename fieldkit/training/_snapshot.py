"""LoraReferenceSnapshot: a CPU copy of the adapter, swapped in for a no-grad reference forward."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from . import _sharding as sharding
from ._adapter import LoadReport, read_adapter
from ._binding import Binding
from ._buffers import pack, packer, stage
from ._checks import StateDict, check_alpha, keys, trainable
from ._guards import Held, changed, write_error
from ._saving import save
from ._state import soft_update_
from ._swap import Mode, bind, check_mode, plan


class LoraReferenceSnapshot:
    """A frozen reference policy for one live peft model, held on the CPU.

    ``with snap:`` swaps the snapshot into the live model, runs the body under
    ``torch.no_grad()``, and restores the trainable weights on exit, also when the body raises
    (``KeyboardInterrupt`` included). No second model or adapter lives on the device, no
    ``requires_grad`` flag changes, and ``train()``/``eval()`` mode is left as you set it (call
    ``model.eval()`` yourself if the reference forward should run without dropout). It is safe
    between a policy forward and its ``backward()``: the gradients are bit-identical to a step
    without the reference forward.

    Args:
        model: the live model (usually a ``peft.PeftModel``).
        snapshot: ``{name: tensor}`` to use instead of the model's current trainable weights,
            e.g. one snapshot shared by several model instances. It is copied to the CPU; names,
            shapes and dtypes must match parameters of ``model``.
        mode: how the swap reaches the model. ``"pointer"`` (default): each parameter's
            ``.data`` is re-pointed at the snapshot — used in place on the CPU, copied to the
            device in one copy per (device, dtype) — and back on exit; the cheapest swap there
            is. ``"copy"``: the snapshot is copied into the parameters' own storage, and the
            live values back on exit (three copies); pick it when something holds on to the
            parameters' storage (CUDA graphs, ``torch.compile(mode="reduce-overhead")``).
            Sharded (FSDP2, ZeRO-3) parameters are copied into this rank's piece in either
            mode, and the snapshot holds that piece (a snapshot taken before the model was
            sharded is cut to it at its first swap).
        check_writes: at each exit, compare the swapped values bit for bit with a copy taken
            at the entry (one more host copy and one compare per swap: a debugging aid).

    What the guards catch inside ``with snap:``: an in-place write through autograd (the
    parameters' version counters) raises at the exit, after the live weights are back; an
    ``optimizer.step()`` on a swapped parameter, of any ``torch.optim`` optimizer (fused ones
    included), is refused before it writes. A write through ``.data`` (``p.data.add_(...)``)
    moves no version counter and is caught only with ``check_writes=True``. Unchecked, it goes
    into the snapshot itself in pointer mode where the snapshot lives on the parameter's
    device (a CPU model): the reference silently changes from then on. In pointer mode on
    another device it goes into the staged copy, and in copy mode into the parameter's own
    storage; either way the exit throws it away.

    On CUDA, the snapshot is copied to the device on the stream current at ``with snap:`` and
    freed at the exit: run the reference forward on that stream. Write into :attr:`state` through
    :meth:`update_`, :meth:`refresh` or :func:`soft_update_`, which wait for copies
    still reading it (a plain ``snap.state[k].copy_(...)`` does not).

    Raises:
        ValueError: unknown names, shape or dtype mismatches in ``snapshot``, or parameters fieldkit
            cannot swap (offloaded to ``meta``, FSDP1, offloaded ZeRO-3, quantized); raised
            here, before any swap.
        RuntimeError: entering a snapshot that is already entered.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> snap = LoraReferenceSnapshot(model)       # the reference: the weights as of now
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)             # a training step moves the policy
    >>> x = torch.ones(1, 2)
    >>> with snap:
    ...     ref = model(x)                         # the reference's output, no grad
    >>> torch.equal(ref, x @ snap.state["weight"].T + snap.state["bias"]), ref.requires_grad
    (True, False)
    >>> len(snap)
    2
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        snapshot: Mapping[str, torch.Tensor] | None = None,
        mode: Mode = "pointer",
        check_writes: bool = False,
    ):
        if snapshot is None:
            snapshot = dict(trainable("LoraReferenceSnapshot", model))
            if not snapshot:
                raise ValueError(
                    "LoraReferenceSnapshot: the model has no trainable parameter, so an online "
                    "snapshot would hold nothing and every `with snap:` would silently give "
                    "the live policy. Inside model.disable_adapter() peft freezes the adapter: "
                    "take the snapshot outside it; PeftModel.from_pretrained loads frozen "
                    "unless is_trainable=True."
                )
        self._setup(model, snapshot, mode, check_writes, report=None, source="online")

    def _setup(
        self,
        model: nn.Module,
        state: Mapping[str, torch.Tensor],
        mode: Mode,
        check_writes: bool,
        report: LoadReport | None,
        source: str,
        params: dict[str, nn.Parameter] | None = None,
        packs: list | None = None,
    ) -> None:
        check_mode("LoraReferenceSnapshot", mode)
        self._model = model
        self.mode = mode
        self.check_writes = bool(check_writes)
        self.report = report
        self._source = source
        self._displaced: list[torch.Tensor] | None = None
        self._exit: tuple | None = None  # what the pending exit needs; None once it has run
        self._entered = False
        self._binding: Binding | None = None
        self._spoiled: list[str] = []  # written through while swapped in: refused until re-taken
        self._take(state, params, packs)

    def _take(
        self,
        state: Mapping[str, torch.Tensor],
        params: dict[str, nn.Parameter] | None = None,
        packs: list | None = None,
    ) -> None:
        """Check ``state`` against the model in full, then keep it packed on the CPU (as it
        is, when ``packs`` says it already is)."""
        if self._binding is not None:  # a re-check: taken before the model was sharded?
            sharding.check_still(any(self._binding.sharded), self._model)
            params = sharding.named_parameters(self._model)
            state = sharding.pieces(state, params)  # then each rank keeps its piece
        swap, values = plan(
            "LoraReferenceSnapshot", self._model, state, "snapshot", self.mode, params
        )
        swap.check_readers()
        binding = Binding(self._model, swap.names)
        if packs is None:
            likes = [sharding.local(p) for p in swap.params]
            self._values, self._packs = pack(values, likes, strided=True, align=True)
        else:
            self._values, self._packs = values, packs
        self._state = dict(zip(swap.names, self._values, strict=True))
        self._swap, self._binding = swap, binding
        # Copy mode saves the live values here; kept between entries, since fresh host memory
        # costs a page fault per 4 KiB on first touch (on CUDA the caching allocator would
        # hold on to it anyway).
        self._stash: list[torch.Tensor] | None = None

    @classmethod
    def from_disk(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike,
        *,
        adapter_name: str = "default",
        weights_filename: str = "adapter_model.safetensors",
        strict: bool = False,
        mode: Mode = "pointer",
        check_writes: bool = False,
    ) -> LoraReferenceSnapshot:
        """Use an adapter saved by peft's ``save_pretrained`` as the reference.

        Reads the file with :func:`load_adapter_dict` (same arguments and errors); the load
        report is kept in ``.report``. File keys without a trainable live parameter are skipped
        and reported, unless ``strict=True``. ``mode`` and ``check_writes`` as in the
        constructor.
        """
        options = dict(adapter_name=adapter_name, weights_filename=weights_filename, strict=strict)
        packs: list = []  # read straight into the packed (pinned, for CUDA) snapshot: one copy
        state, report, params = read_adapter(model, adapter_dir, into=packer(packs), **options)
        snap = cls.__new__(cls)
        snap._setup(model, state, mode, check_writes, report, report.path, params, packs)
        return snap

    @property
    def state(self) -> StateDict:
        """The snapshot itself: ``{live parameter name: CPU tensor}``. Don't modify it while
        the snapshot is entered. The tensors are views into one buffer per (device, dtype), so
        that each moves in one copy; to save them, use :meth:`save_pretrained`."""
        return self._state

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the reference as a peft adapter directory, which every tool reads.

        For a ``peft.PeftModel``: ``adapter_model.safetensors`` under peft's own file keys (the
        map :meth:`from_disk` reads, reversed) and the live adapter's ``adapter_config.json``,
        so that ``PeftModel.from_pretrained(base, directory)`` computes the reference's logits
        and ``from_disk(model, directory, strict=True)`` gives back this state, bit for bit.
        For any other model: ``reference.safetensors`` keyed by parameter name, which
        :meth:`from_disk` reads back. The write is atomic: a temporary directory renamed into
        place (an existing one is replaced), so a crash never leaves a half-written adapter.

        Returns:
            The directory's absolute path.

        Under FSDP2 and ZeRO-3 each rank holds a piece: it is a collective then, which every
        rank must call. The pieces are gathered and rank 0 writes one whole adapter, readable
        by peft and by :meth:`from_disk` on any number of ranks (each reads its own piece).

        Raises:
            RuntimeError: the snapshot is entered, or was written through while swapped in.
            ValueError: the tensors belong to more than one peft adapter.
        """
        fn = "LoraReferenceSnapshot.save_pretrained"
        if self.active:
            raise RuntimeError(f"{fn}: the snapshot is entered; save it outside `with snap:`")
        self._check_intact(fn)
        self._rebound()
        return save(self._model, self._swap.names, self._swap.params, self._state, directory)

    def __reduce__(self):
        raise TypeError(
            "LoraReferenceSnapshot cannot be pickled: a pickle would carry a private copy of "
            "the whole model, and the unpickled snapshot would swap into that copy, not into "
            "your live model. Save it with snap.save_pretrained(directory) and read it back "
            "with LoraReferenceSnapshot.from_disk(model, directory)."
        )

    def update_(self, model: nn.Module, alpha: float) -> None:
        """Soft reference update: ``ref ← (1 − alpha)·ref + alpha·policy`` on the snapshot itself
        (TR-DPO's ``ref_model_mixup_alpha``, an EMA reference), as :func:`soft_update_` computes
        it. ``model`` is the policy (usually the snapshot's own model); names, shapes and
        dtypes are checked as for the swap, before anything is written.

        Raises:
            RuntimeError: the snapshot is entered (the model is reading it), or it was written
                through while swapped in (only ``alpha=1``, a re-take, mends that).
            ValueError, TypeError: a bad ``alpha``, or a ``model`` that does not match.
        """
        self._mix("LoraReferenceSnapshot.update_", model, alpha)

    def refresh(self, model: nn.Module) -> None:
        """Re-take the snapshot from ``model``'s current weights, in place (a hard reference
        sync, TRL's ``ref_model_sync_steps`` with ``alpha=1``); checks as :meth:`update_`."""
        self._mix("LoraReferenceSnapshot.refresh", model, 1.0)

    def _mix(self, fn: str, model: nn.Module, alpha: float) -> None:
        check_alpha(fn, alpha)
        if self.active:
            raise RuntimeError(f"{fn}: the snapshot is entered; update it outside `with snap:`")
        if alpha != 1.0:
            self._check_intact(fn)
        if model is self._model:
            self._rebound()
        bound = bind(fn, model, self._state, "snapshot")
        Held.refuse_reads(fn, [p for _, p, _ in bound])
        soft_update_(self._state, {name: sharding.local(p) for name, p, _ in bound}, alpha)
        self._spoiled = []

    def _rebound(self) -> None:
        """Bind again, checking everything, where the model changed since the last use; a
        snapshot taken before the model was sharded (a ``Trainer`` shards it inside
        ``train()``) is cut to this rank's pieces here, at its first use of any kind."""
        sharding.reshard(self._binding.fsdp)  # FSDP2 registers its sharded parameters again
        if not self._binding.current():
            self._take(self._state)

    def _check_intact(self, fn: str) -> None:
        if self._spoiled:
            raise RuntimeError(
                f"{fn}: this snapshot was written in place while swapped in (parameter(s) "
                f"{keys(self._spoiled, 4)}), so it no longer holds the reference it was "
                "taken as. Re-take it (snap.refresh(model), or a new snapshot) before using it."
            )

    @property
    def active(self) -> bool:
        """Whether the snapshot is swapped into the model right now (or left out of order and
        waiting for the swaps entered after it to leave)."""
        return self._displaced is not None

    def __enter__(self) -> LoraReferenceSnapshot:
        token = object()
        owner = self._swap.owner
        owner.enter(token)  # waits while another thread has this model swapped
        grad = torch.is_grad_enabled()
        try:
            if self._displaced is not None:
                raise RuntimeError(
                    "LoraReferenceSnapshot is already entered: one swap at a time per snapshot. "
                    "Leave the outer `with snap:` block first."
                )
            self._check_intact("LoraReferenceSnapshot")
            self._rebound()
            if self._stash is None:
                self._stash = self._swap.stash()
            copies = [v.clone() for v in self._values] if self.check_writes else None
            staged = stage(self._values, self._packs)
            torch.set_grad_enabled(False)
            self._displaced = self._swap.put(staged, self._stash, holder=self)
        except BaseException:
            owner.leave(token, lambda: torch.set_grad_enabled(grad))
            raise
        # Not the staged device copy: the parameters hold it until the exit, and no longer.
        self._exit = (token, grad, self._swap.versions, copies)
        self._entered = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._exit is None:  # every exit after the first does nothing
            if not self._entered:
                raise RuntimeError(
                    "LoraReferenceSnapshot.__exit__: this snapshot was never entered; use it "
                    "as `with snap:`. Nothing was changed."
                )
            return
        (token, grad, since, copies), self._exit = self._exit, None
        written: list[str] = []
        unseen: list[str] = []  # changed without autograd seeing it (check_writes)
        spoiled: list[str] = []

        def undo() -> None:
            try:
                sharding.reshard(self._binding.fsdp)
                if copies is not None:
                    names = self._swap.names
                    live = [sharding.local(p) for p in self._swap.params]
                    spoiled.extend(changed(names, self._values, copies))
                    unseen.extend(sorted(set(changed(names, live, copies)) | set(spoiled)))
            finally:  # the live weights come back whatever failed before
                try:
                    written.extend(self._swap.take_back(self._displaced, since))
                finally:
                    self._displaced = None
                    torch.set_grad_enabled(grad)

        if not self._swap.owner.leave(token, undo):
            raise RuntimeError(
                "LoraReferenceSnapshot: left out of order: another swap of this model was "
                "entered after this one and is still in place, so this one cannot be undone "
                "yet. The model's live weights come back when that one leaves; leave `with` "
                "blocks in the reverse order of entering them."
            )
        if written or unseen:
            # Pointer mode where the snapshot lives on the parameter's device: the parameters
            # were the snapshot's own tensors, so an in-place write went into it.
            if self.mode == "pointer":
                own = {i for device, flat, idx in self._packs if flat.device == device for i in idx}
                spoiled += [self._swap.names[i] for i in own if self._swap.names[i] in written]
            self._spoiled = sorted(set(spoiled))
            raise write_error(written, unseen, bool(self._spoiled))

    def __len__(self) -> int:
        return len(self._state)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._state.values())
        nbytes = sum(t.numel() * t.element_size() for t in self._state.values())
        return (
            f"LoraReferenceSnapshot(source={self._source!r}, tensors={len(self)}, "
            f"params={numel:,}, bytes={nbytes / 2**20:.2f} MiB, mode={self.mode!r}, "
            f"active={self.active})"
        )
