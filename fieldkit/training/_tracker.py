"""WeightDeltaTracker: did training move the weights, and by how much."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import _sharding as sharding
from ._binding import Binding
from ._buffers import copy_all, pack
from ._checks import check_shapes, keys, trainable
from ._delta import DeltaPlan
from ._guards import Held
from ._report import DeltaReport, delta_report


class WeightDeltaTracker:
    """Snapshot the trainable parameters now; ``delta()`` measures how far they moved since.

    The snapshot is a CPU copy of every parameter with ``requires_grad=True`` at construction.
    ``delta()`` re-reads the live model in place (on the CPU in one pass of a C kernel) and
    returns the aggregate L2 norm and max absolute value of the change over the captured
    tensors, computed as :func:`weight_delta` does. Tensors that became trainable later, or
    that left the model, are ignored; ``(0.0, 0.0)`` when nothing was captured.

    Args:
        model: the live model.

    Raises:
        ValueError: a trainable parameter fieldkit cannot read (offloaded to ``meta``, FSDP1,
            offloaded ZeRO-3, quantized). Sharded (FSDP2, ZeRO-3): the snapshot is this rank's
            piece, and ``delta()`` / ``report()`` are collectives that return global figures.

    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> _ = torch.nn.init.zeros_(model.bias)
    >>> tracker = WeightDeltaTracker(model)
    >>> with torch.no_grad():
    ...     _ = model.bias.add_(0.5)
    >>> tracker.delta()
    (0.5, 0.5)
    >>> len(tracker)
    2
    """

    def __init__(self, model: nn.Module):
        self._model = model
        found = trainable("WeightDeltaTracker", model)
        locals_ = [v for _, v in found]
        self._before = dict(zip([n for n, _ in found], pack(locals_, locals_)[0], strict=True))
        self._binding = Binding(model, list(self._before))
        self._plan = None  # made on the first delta()

    def _bound(self, fn: str, *, read: bool = True) -> Binding:
        # The plan holds views of the parameters' storage: make both again if anything moved.
        sharding.reshard(self._binding.fsdp)  # FSDP2 registers its sharded parameters again
        if not self._binding.current():
            sharding.check_still(any(self._binding.sharded), self._model, type(self).__name__)
            live = sharding.named_parameters(self._model)
            names = [n for n in self._before if n in live]
            # Made before fully_shard, deepspeed.initialize or accelerate's prepare: each rank
            # measures its pieces against its pieces of the "before" tensors.
            cut = sharding.pieces({n: self._before[n] for n in names}, live)
            self._before.update((n, v.clone()) for n, v in cut.items() if v is not self._before[n])
            check_shapes(fn, [(n, self._before[n], live[n]) for n in names], ("tracker", "model"))
            self._binding = Binding(self._model, names)
            self._plan = None
        if read:
            Held.refuse_reads(fn, self._binding.params)
        return self._binding

    def delta(self) -> tuple[float, float]:
        """``(l2, max_abs)`` of the live trainable weights minus the snapshot."""
        self._bound("WeightDeltaTracker.delta")
        if self._plan is None:
            befores = [self._before[n] for n in self._binding.names]
            self._plan = DeltaPlan(befores, self._binding.params)
        return self._plan.measure()

    def report(self) -> DeltaReport:
        """Per-tensor figures and, for each tensor that did not move, the likely cause (see
        :func:`delta_report`). Call it before ``optimizer.zero_grad()`` so the gradients can
        tell the causes apart. ``print()`` it for a table; ``.rows`` / ``.to_dict()`` for code.
        """
        binding = self._bound("WeightDeltaTracker.report")
        before = {n: self._before[n] for n in binding.names}
        return delta_report(before, dict(zip(binding.names, binding.params, strict=True)))

    def reset(self) -> None:
        """Take the snapshot again, now, in place (same tensors, no new memory): ``delta()``
        then measures from here."""
        binding = self._bound("WeightDeltaTracker.reset")
        befores = [self._before[n] for n in binding.names]
        copy_all(befores, [sharding.local(p) for p in binding.params])

    def state_dict(self, *, whole: bool = False) -> dict[str, torch.Tensor]:
        """The starting point, ``{name: CPU tensor}`` (copies): save it (e.g. with safetensors)
        so that "since the start" survives a restart; :meth:`load_state_dict` takes it back.

        Sharded (FSDP2, ZeRO-3), each rank holds its pieces; ``whole=True`` gathers them into
        whole tensors (a collective then: every rank must call it), which
        :meth:`load_state_dict` cuts back to each rank's pieces, on any number of ranks."""
        if not whole:
            return {n: v.clone() for n, v in self._before.items()}
        binding = self._bound("WeightDeltaTracker.state_dict", read=False)
        params = dict(zip(binding.names, binding.params, strict=True))
        return {
            n: sharding.gather(params[n], v) if sharding.is_sharded(params.get(n)) else v.clone()
            for n, v in self._before.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Measure from ``state`` (a :meth:`state_dict`, saved before a restart) instead of the
        weights at construction: in place, every name checked before anything is written.

        Whole tensors of sharded parameters (``state_dict(whole=True)``) are cut to this
        rank's pieces first.

        Raises:
            ValueError: names the tracker does not hold, missing names, or shape mismatches.
        """
        fn = "WeightDeltaTracker.load_state_dict"
        binding = self._bound(fn, read=False)
        state = sharding.pieces(dict(state), dict(zip(binding.names, binding.params, strict=True)))
        unexpected = [k for k in state if k not in self._before]
        missing = [k for k in self._before if k not in state]
        if unexpected or missing:
            raise ValueError(
                f"{fn}: Missing key(s): {keys(missing) or 'none'}. "
                f"Unexpected key(s): {keys(unexpected) or 'none'}."
            )
        check_shapes(fn, [(k, v, state[k]) for k, v in self._before.items()], ("tracker", "state"))
        with torch.no_grad():
            for name, before in self._before.items():
                before.copy_(state[name])

    def __reduce__(self):
        raise TypeError(
            "WeightDeltaTracker cannot be pickled (it would carry a copy of the whole model): "
            "save tracker.state_dict() and restore it with load_state_dict() on a new tracker."
        )

    def __len__(self) -> int:
        return len(self._before)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._before.values())
        return f"WeightDeltaTracker(tensors={len(self)}, params={numel:,})"
