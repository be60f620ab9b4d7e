"""The swap engine: check a state against a model, put its values into the live parameters
all-or-nothing, and put the live values back bit for bit.

Plan once, run many: :class:`Swap` is made once from a checked binding of names to parameters;
:func:`swap_in` / :func:`restore` make one and run it once, :class:`LoraReferenceSnapshot` makes
one and runs it every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from . import _sharding as sharding
from ._buffers import join_default, packed, rejoin_default, to_devices
from ._checks import check_usable, first, keys, shape
from ._guards import Held, Owner, Readers, forget_casts, versions, written
from ._zero import is_zero3 as zero_3

Mode = Literal["pointer", "copy"]
MODES: tuple[Mode, ...] = ("pointer", "copy")


def check_mode(fn: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")


def bind(
    fn: str,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    arg: str,
    params: dict[str, nn.Parameter] | None = None,
) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """Check ``state`` against ``model`` completely and pair each value with its parameter.
    ``params``: the model's ``sharding.named_parameters``, when the caller already walked it."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{fn}: {arg} must be a mapping of name -> Tensor, got {type(state).__name__}"
        )
    params = sharding.named_parameters(model) if params is None else params
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise ValueError(
            f"{fn}: Unexpected key(s) in {arg}: {keys(unexpected)}. These are not parameters "
            f"of {type(model).__name__}; {arg} must be keyed by model.named_parameters() names. "
            "Nothing was changed."
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"{fn}: {arg} values must be Tensors; not for key(s) {keys(not_tensors)}")
    bound = [(k, params[k], v) for k, v in state.items()]
    check_usable(fn, [(k, p) for k, p, _ in bound])
    # A sharded parameter (FSDP2) takes values shaped like its local shard.
    shapes = {k: shape(p) for k, p, _ in bound}
    full = [
        k
        for k, p, v in bound
        if sharding.is_sharded(p) and v.shape == sharding.full_shape(p) != shapes[k]
    ]
    if full:
        raise ValueError(
            f"{fn}: {arg} holds full (unsharded) tensors for sharded (FSDP2, ZeRO-3) parameters "
            f"{keys(full)}; take the snapshot on the sharded model, or read it with from_disk, "
            "which keeps this rank's shard. Nothing was changed."
        )
    mismatched = [
        f"{k!r}: {arg} has {tuple(v.shape)} {v.dtype}, the model has "
        f"{tuple(shapes[k])} {p.dtype}" + (" (this rank's shard)" if sharding.is_sharded(p) else "")
        for k, p, v in sorted(bound, key=lambda t: t[0])
        if v.shape != shapes[k] or v.dtype != p.dtype
    ]
    if mismatched:
        raise ValueError(
            f"{fn}: shape or dtype mismatch for {len(mismatched)} key(s): "
            + first(mismatched, sep="; ")
            + ". Nothing was changed."
        )
    meta_values = [k for k, _, v in bound if v.is_meta]
    if meta_values:
        raise ValueError(f"{fn}: {arg} holds 'meta' tensors (no values) for {keys(meta_values)}")
    return bound


class Swap:
    """The swap of values into ``params`` of ``model`` in one ``mode``: :meth:`put` swaps in,
    all or nothing, and returns the displaced live values; :meth:`take_back` puts them back.

    Sharded (FSDP2) parameters are always copied into their local shard, since FSDP2
    all-gathers from its own shard storage; the others are copied in ``"copy"`` mode and
    re-pointed (``.data``) in ``"pointer"`` mode. The guards (``_guards``) run on every call:
    the peft layers that read the parameters are checked, autocast's cache is cleared, and the
    parameters' versions are read after the swap, so :meth:`take_back` can tell what was
    written in place meanwhile.
    """

    def __init__(
        self, fn: str, model: nn.Module, names: list[str], params: list[nn.Parameter], mode: Mode
    ):
        self.fn, self.names, self.params, self.mode = fn, names, params, mode
        self.copied = [i for i, p in enumerate(params) if mode == "copy" or sharding.is_sharded(p)]
        self.shards = [i for i in self.copied if sharding.is_sharded(params[i])]
        self.model, self.owner = model, Owner.of(model)
        self.held = Held(names, params)
        self.zero3 = [(n, p) for n, p in zip(names, params, strict=True) if zero_3(p)]
        # Swaps queued on a side stream are ordered after the default stream's work (the
        # optimizer step) at entry, and before its later work (the policy forward) at exit.
        self.cuda = sorted({sharding.local(p).device for p in params if p.is_cuda}, key=str)
        self._readers: Readers | None = None  # made on the first put: restore never needs it
        self.versions: list[int] = []

    def _shards(self) -> list[torch.Tensor]:
        """The local shards this swap writes into (FSDP2), whose readers must be waited for."""
        return [sharding.local(self.params[i]) for i in self.shards]

    def check_readers(self) -> None:
        """Refuse, naming layers and fixes, a swap the model's peft layers would not read."""
        if self._readers is None:
            self._readers = Readers(self.model, self.names)
        self._readers.check(self.fn)

    def stash(self) -> list[torch.Tensor]:
        """Room for the live values of the copied parameters, one buffer per (device, dtype)."""
        return packed([sharding.local(self.params[i]) for i in self.copied], on_host=False)[0]

    def put(
        self,
        values: list[torch.Tensor],
        stash: list[torch.Tensor] | None = None,
        holder: object = "swap_in",
    ) -> list[torch.Tensor]:
        """Put ``values`` (already on the parameters' devices) into the parameters; all or
        nothing. ``stash``: where the copied parameters' live values go (see :meth:`stash`);
        ``holder``: who an optimizer step on them is told holds them.

        Raises:
            ValueError: a peft layer that reads a parameter would not read the swapped value
                (merged, disabled, another adapter active); nothing was changed.
        """
        self.check_readers()
        params, copied = self.params, self.copied
        # The forward must gather what is written.
        sharding.release(self.zero3, self.model, refuse=True)
        join_default(self.cuda)
        datas = [sharding.local(p) for p in params]
        displaced = list(datas)
        if copied:
            # Writes go through `.data`, whose version counter is not the parameter's: a pending
            # backward stays valid, and sees the original values again after the restore.
            targets = [datas[i] for i in copied]
            saved = self.stash() if stash is None else stash
            shards = self._shards()
            sharding.before_shard_writes(shards)
            torch._foreach_copy_(saved, targets)
            try:
                torch._foreach_copy_(targets, [values[i] for i in copied])
            except BaseException:
                torch._foreach_copy_(targets, saved)
                raise
            finally:
                sharding.after_shard_writes(shards)
            for i, old in zip(copied, saved, strict=True):
                displaced[i] = old
        done: list[int] = []
        skip = set(copied)
        try:
            for i, param in enumerate(params):
                if i not in skip:
                    # Re-pointing `.data` leaves the parameter object, its requires_grad and its
                    # autograd version counter alone, so a pending backward stays valid.
                    param.data = values[i]
                    done.append(i)
        except BaseException:
            for i in done:
                params[i].data = datas[i]
            if copied:
                torch._foreach_copy_(targets, saved)
            raise
        forget_casts()
        self.versions = versions(params)
        self.held.hold(holder)
        return displaced

    def take_back(self, displaced: list[torch.Tensor], since: list[int] | None = None) -> list[str]:
        """Put back what :meth:`put` displaced: re-attach the original storage, or copy the
        saved values back into the parameters' own storage. Returns the names of the
        parameters written in place since their versions were ``since`` (e.g.
        :attr:`versions` right after :meth:`put`); their live values are back all the same."""
        params, copied = self.params, self.copied
        changed = [] if since is None else written(self.names, params, since)
        try:
            # Before the writes: no gather of the reference (in flight, or left by a forward
            # that raised) may outlive the swap, nor read a piece while it is written.
            sharding.release(self.zero3, self.model, refuse=False)
            if copied:
                shards = self._shards()
                sharding.before_shard_writes(shards)
                torch._foreach_copy_(
                    [sharding.local(params[i]) for i in copied], [displaced[i] for i in copied]
                )
                sharding.after_shard_writes(shards)
            skip = set(copied)
            for i, (param, old) in enumerate(zip(params, displaced, strict=True)):
                if i not in skip:
                    param.data = old
            forget_casts()
            rejoin_default(self.cuda)
        finally:
            self.held.release()
        return changed


def plan(
    fn: str,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    arg: str,
    mode: Mode,
    params: dict[str, nn.Parameter] | None = None,
) -> tuple[Swap, list[torch.Tensor]]:
    """Check ``state`` against ``model`` (see :func:`bind`) and plan its swap: the
    :class:`Swap`, and ``state``'s values in the order of its parameters."""
    check_mode(fn, mode)
    bound = bind(fn, model, state, arg, params)
    swap = Swap(fn, model, [n for n, _, _ in bound], [p for _, p, _ in bound], mode)
    return swap, [v for _, _, v in bound]


class Displaced(dict):
    """What :func:`swap_in` returns: ``{name: displaced live value}``, a plain dict that also
    remembers the ``mode`` of the swap, so that :func:`restore` undoes it the same way, and
    each parameter's autograd version after the swap, so that it can tell what was written
    in place meanwhile."""

    mode: Mode = "pointer"
    versions: dict[str, int] = {}


def swap_in(
    model: nn.Module, state: Mapping[str, torch.Tensor], /, *, mode: Mode = "pointer"
) -> Displaced:
    """Put ``state``'s values into the live parameters of the same names.

    Parameter objects, ``requires_grad``, the optimizer's references and the autograd version
    counters are untouched in either mode, so the swap is safe between a policy forward and its
    ``backward()`` once :func:`restore` has run.

    - ``mode="pointer"`` (default) re-points each parameter's ``.data`` at the value. Values
      already on the parameter's device are used in place (no copy): don't modify ``state``
      while swapped in. Values on another device are copied there first (non-blocking from
      pinned memory; one copy per group when they are packed back to back, as in
      :attr:`LoraReferenceSnapshot.state`). :func:`restore` re-attaches the original storage.
    - ``mode="copy"`` writes the values into the parameters' own storage (saving the live values
      first), for code that holds on to parameter storage: CUDA graphs, kernels that cache
      pointers. Three copies per round trip instead of at most one.

    Sharded (FSDP2) parameters are always copied into the local shard, whatever the mode: FSDP2
    all-gathers from that storage.

    Args:
        model: the live model.
        state: name -> tensor, keyed by ``named_parameters()`` names; a subset is fine. Shapes
            and dtypes must equal the live parameters'.
        mode: ``"pointer"`` or ``"copy"``, as above.

    Returns:
        ``displaced``: the live values that were swapped out (a dict that remembers ``mode``),
        for :func:`restore`.

    Raises:
        ValueError: unknown names, shape or dtype mismatches, parameters fieldkit cannot swap
            (offloaded to ``meta``, FSDP1, offloaded ZeRO-3, quantized), an unknown mode, or
            peft layers that would not read the swapped values (merged, disabled, another
            adapter active). All-or-nothing: everything is checked before anything
            is written, and after any error the model holds exactly what it held before.
        TypeError: ``state`` is not a mapping of tensors.
        RuntimeError: another thread has the model swapped (a snapshot entered there).

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> before = layer.weight.detach().clone()
    >>> displaced = swap_in(layer, {"weight": torch.zeros(2, 2)})
    >>> float(layer.weight.detach().abs().sum())
    0.0
    >>> restore(layer, displaced)
    >>> torch.equal(layer.weight, before)
    True
    """
    swap, values = plan("swap_in", model, state, "state", mode)
    swap.owner.check_free("swap_in")
    # Stage every value on its parameter's device before touching the model, so a failed copy
    # (out of memory, say) leaves the model untouched.
    old = swap.put(to_devices(values, swap.params))
    displaced = Displaced(zip(swap.names, old, strict=True))
    displaced.mode = mode
    displaced.versions = dict(zip(swap.names, swap.versions, strict=True))
    return displaced


def restore(model: nn.Module, displaced: Mapping[str, torch.Tensor], /) -> None:
    """Undo :func:`swap_in`: put the displaced values back, bit for bit, the way they left.

    After a ``"pointer"`` swap the original storage is re-attached, not copied back, so the
    restore is exact by construction; after a ``"copy"`` swap (``displaced.mode``) the saved
    values are copied back into the parameters' own storage. Either way every parameter is the
    same object it was. A plain dict is restored as after a ``"pointer"`` swap.

    Args:
        model: the model passed to :func:`swap_in`.
        displaced: what :func:`swap_in` returned.

    Raises:
        ValueError, TypeError: as :func:`swap_in`, checked before anything is written.
        RuntimeError: a swapped parameter was written in place between :func:`swap_in` and
            here (its autograd version moved: an ``optimizer.step()``, say); raised after
            the live values are back, bit for bit. Or another thread has the model swapped.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> weight = layer.weight
    >>> restore(layer, swap_in(layer, {"weight": torch.ones(2, 2)}))
    >>> layer.weight is weight
    True
    """
    swap, values = plan(
        "restore", model, displaced, "displaced", getattr(displaced, "mode", "pointer")
    )
    swap.owner.check_free("restore")
    since = getattr(displaced, "versions", {})
    changed = swap.take_back(
        to_devices(values, swap.params),
        [since.get(n, p._version) for n, p in zip(swap.names, swap.params, strict=True)],
    )
    if changed:
        raise RuntimeError(
            f"restore: parameter(s) {keys(changed)} were written in place while swapped in "
            "(an optimizer step, or another in-place op, between swap_in and restore). The "
            "live values are back, bit for bit, and that write is gone"
            + (
                "; in pointer mode a value used in place (already on the parameter's "
                "device) took that write: the state you passed to swap_in changed too"
                if swap.mode == "pointer"
                else ""
            )
            + ". Step the optimizer after restore."
        )
