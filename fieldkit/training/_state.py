"""Pure functions over plain state dicts: capture, swap in, restore, measure, soft-update."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

from . import _kernel
from . import _sharding as sharding

StateDict = dict[str, torch.Tensor]
"""A plain state dict: parameter name (as ``named_parameters()`` spells it) to tensor."""


def _first(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and how many more were cut."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... (+{len(items) - limit} more)" if len(items) > limit else "")


def _keys(names: Iterable[str], limit: int = 8) -> str:
    return _first([repr(n) for n in sorted(names)], limit)


def _unusable(param: torch.Tensor) -> str | None:
    if param.is_meta:
        return (
            "on the 'meta' device (offloaded by accelerate, or never materialised); "
            "keep the adapter's parameters on a real device (e.g. a device_map that does not "
            "offload them to 'cpu'/'disk')"
        )
    return sharding.unusable(param)


def _check_usable(fn: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise one ValueError naming every parameter fieldkit cannot read or swap."""
    problems: dict[str, list[str]] = {}
    for name, param in named:
        why = _unusable(param)
        if why is not None:
            problems.setdefault(why, []).append(name)
    if problems:
        lines = [f"parameter(s) {_keys(names)} are {why}" for why, names in problems.items()]
        raise ValueError(f"{fn}: " + ". ".join(lines) + ". Nothing was changed.")


def _host_copy(tensor: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy in ``like``'s dtype; pinned when ``like`` lives on CUDA, so the
    copy to the device can be non-blocking."""
    out = torch.empty(
        tensor.shape, dtype=like.dtype, device="cpu", pin_memory=like.device.type == "cuda"
    )
    return out.copy_(tensor.detach())


def capture_trainable(model: nn.Module, /) -> StateDict:
    """Copy every trainable parameter of ``model`` to the CPU.

    Args:
        model: any module; the parameters with ``requires_grad=True`` are copied.

    Returns:
        A new dict ``{name: tensor}`` keyed by ``named_parameters()`` names. The tensors are
        contiguous CPU copies (pinned when the parameter is on CUDA), detached, never sharing
        storage with the model. Empty when nothing is trainable.

    Raises:
        ValueError: a trainable parameter fieldkit cannot read (offloaded to ``meta``, FSDP1,
            DeepSpeed ZeRO-3, quantized); the message names them. For a sharded (FSDP2)
            parameter the copy is this rank's shard.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> state = capture_trainable(layer)
    >>> sorted(state), state["weight"].device.type
    (['bias', 'weight'], 'cpu')
    >>> state["weight"].data_ptr() != layer.weight.data_ptr()
    True
    """
    return {name: _host_copy(v, like=v) for name, v in _trainable("capture_trainable", model)}


def _trainable(fn: str, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, local tensor)`` of every trainable parameter, each checked to be usable."""
    trainable = [(n, p) for n, p in sharding.named_parameters(model).items() if p.requires_grad]
    _check_usable(fn, trainable)
    return [(name, sharding.local(param)) for name, param in trainable]


def _bind(fn: str, model: nn.Module, state: Mapping[str, torch.Tensor], arg: str):
    """Check ``state`` against ``model`` completely and pair each value with its parameter."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{fn}: {arg} must be a mapping of name -> Tensor, got {type(state).__name__}"
        )
    params = sharding.named_parameters(model)
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise ValueError(
            f"{fn}: Unexpected key(s) in {arg}: {_keys(unexpected)}. These are not parameters "
            f"of {type(model).__name__}; {arg} must be keyed by model.named_parameters() names. "
            "Nothing was changed."
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"{fn}: {arg} values must be Tensors; not for key(s) {_keys(not_tensors)}")
    bound = [(k, params[k], v) for k, v in state.items()]
    _check_usable(fn, [(k, p) for k, p, _ in bound])
    # A sharded parameter (FSDP2) takes values shaped like its local shard.
    shapes = {k: _shape(p) for k, p, _ in bound}
    full = [k for k, p, v in bound if sharding.is_sharded(p) and v.shape == p.shape != shapes[k]]
    if full:
        raise ValueError(
            f"{fn}: {arg} holds full (unsharded) tensors for sharded (FSDP2) parameters "
            f"{_keys(full)}; take the snapshot on the sharded model, or read it with from_disk, "
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
            + _first(mismatched, sep="; ")
            + ". Nothing was changed."
        )
    meta_values = [k for k, _, v in bound if v.is_meta]
    if meta_values:
        raise ValueError(f"{fn}: {arg} holds 'meta' tensors (no values) for {_keys(meta_values)}")
    return bound


Mode = Literal["pointer", "copy"]
MODES: tuple[Mode, ...] = ("pointer", "copy")


class Displaced(dict):
    """What :func:`swap_in` returns: ``{name: displaced live value}``, a plain dict that also
    remembers the ``mode`` of the swap, so that :func:`restore` undoes it the same way."""

    mode: Mode = "pointer"


def _check_mode(fn: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")


def _span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D view that covers ``tensors`` when they lie back to back, in order, in one
    storage (as packed by :func:`_pack`); otherwise None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.storage_offset() != offset
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        offset += t.numel()
    flat = first.new_empty(0)
    return flat.set_(
        first.untyped_storage(), first.storage_offset(), (offset - first.storage_offset(),)
    )


def _groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, back to back (one C++ call)."""
    return list(_unflatten_dense_tensors(flat, like))


Pack = tuple[torch.device, torch.Tensor, list[int]]
"""(target device, one flat buffer, the indices of the tensors that are views into it)."""


def _packed(likes: list[torch.Tensor], *, on_host: bool) -> tuple[list[torch.Tensor], list[Pack]]:
    """Uninitialised tensors shaped like ``likes``: views into one buffer per (device, dtype)
    of ``likes``, on that device, or on the CPU when ``on_host`` (pinned for CUDA, so that
    each buffer moves to its device in one non-blocking copy)."""
    out: list[torch.Tensor] = [None] * len(likes)  # type: ignore[list-item]
    packs: list[Pack] = []
    for (device, dtype), idx in _groups(likes).items():
        flat = torch.empty(
            sum(likes[i].numel() for i in idx),
            dtype=dtype,
            device="cpu" if on_host else device,
            pin_memory=on_host and device.type == "cuda",
        )
        for i, view in zip(idx, _views(flat, [likes[i] for i in idx]), strict=True):
            out[i] = view
        packs.append((device, flat, idx))
    return out, packs


def _pack(
    values: list[torch.Tensor], likes: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[Pack]]:
    """CPU copies of ``values``, packed as :func:`_packed` lays out ``likes``."""
    out, packs = _packed(likes, on_host=True)
    for view, value in zip(out, values, strict=True):
        view.copy_(value.detach())
    return out, packs


def _stage(values: list[torch.Tensor], packs: list[Pack]) -> list[torch.Tensor]:
    """``values`` with every pack that lives elsewhere moved to its device in one
    (non-blocking, from pinned memory) copy."""
    out = list(values)
    for device, flat, idx in packs:
        if flat.device != device:
            moved = _views(flat.to(device, non_blocking=True), [values[i] for i in idx])
            for i, v in zip(idx, moved, strict=True):
                out[i] = v
    return out


def _to_devices(values: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each value on its parameter's device: used in place when already there, otherwise
    copied (non-blocking from pinned memory), in one copy per group packed back to back."""
    out = list(values)
    moving = [
        i for i, (v, p) in enumerate(zip(values, params, strict=True)) if v.device != p.device
    ]
    packs: list[Pack] = []
    for (device, _), idx in _groups([params[i] for i in moving]).items():
        idx = [moving[i] for i in idx]
        flat = _span([values[i] for i in idx])
        if flat is not None:
            packs.append((device, flat, idx))
            continue
        for i in idx:
            out[i] = values[i].to(device, non_blocking=True)
    return _stage(out, packs)


def _copied(params: list[torch.Tensor], mode: Mode) -> list[bool]:
    """Which parameters a swap copies into: all in ``"copy"`` mode, and sharded (FSDP2) ones
    always, since FSDP2 all-gathers from its own shard storage."""
    return [mode == "copy" or sharding.is_sharded(p) for p in params]


def _swap(
    params: list[torch.Tensor],
    values: list[torch.Tensor],
    mode: Mode,
    stash: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Put ``values`` (already on the parameters' devices) into ``params``; all or nothing.
    Returns what :func:`_unswap` needs to undo it. ``stash``: where the copied parameters'
    live values are saved (allocated here when not given)."""
    datas = [sharding.local(p) for p in params]
    copied = [i for i, c in enumerate(_copied(params, mode)) if c]
    displaced = list(datas)
    if copied:
        # Writes go through `.data`, whose version counter is not the parameter's: a pending
        # backward stays valid, and sees the original values again after the restore.
        targets = [datas[i] for i in copied]
        saved = _packed(targets, on_host=False)[0] if stash is None else stash
        torch._foreach_copy_(saved, targets)
        try:
            torch._foreach_copy_(targets, [values[i] for i in copied])
        except BaseException:
            torch._foreach_copy_(targets, saved)
            raise
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
    return displaced


def _unswap(params: list[torch.Tensor], displaced: list[torch.Tensor], mode: Mode) -> None:
    copied = _copied(params, mode)
    targets = [
        (sharding.local(p), d) for p, d, c in zip(params, displaced, copied, strict=True) if c
    ]
    if targets:
        torch._foreach_copy_([t for t, _ in targets], [d for _, d in targets])
    for param, old, c in zip(params, displaced, copied, strict=True):
        if not c:
            param.data = old


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
            (offloaded to ``meta``, FSDP1, DeepSpeed ZeRO-3, quantized), an unknown mode.
            All-or-nothing: everything is checked before anything
            is written, and after any error the model holds exactly what it held before.
        TypeError: ``state`` is not a mapping of tensors.

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
    _check_mode("swap_in", mode)
    bound = _bind("swap_in", model, state, "state")
    names, params, values = (list(x) for x in zip(*bound, strict=True)) if bound else ([], [], [])
    # Stage every value on its parameter's device before touching the model, so a failed copy
    # (out of memory, say) leaves the model untouched.
    old = _swap(params, _to_devices(values, params), mode)
    displaced = Displaced(zip(names, old, strict=True))
    displaced.mode = mode
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

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> weight = layer.weight
    >>> restore(layer, swap_in(layer, {"weight": torch.ones(2, 2)}))
    >>> layer.weight is weight
    True
    """
    mode = getattr(displaced, "mode", "pointer")
    _check_mode("restore", mode)
    bound = _bind("restore", model, displaced, "displaced")
    params = [p for _, p, _ in bound]
    _unswap(params, _to_devices([v for _, _, v in bound], params), mode)


def weight_delta(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], /
) -> tuple[float, float]:
    """L2 norm and max absolute value of ``after - before`` over all tensors together.

    Differences in float32 (float64 when either side is float64 or not a float). Contiguous CPU
    pairs of one dtype, float32 or bfloat16, go to a fused C kernel (``_kernel``): one pass,
    float64 sums, no extra tensor memory. The rest go through torch ops in runs of tensors of at
    most ``CHUNK`` elements: a few ops per run rather than per tensor, extra memory one buffer
    of max(``CHUNK``, the largest tensor) elements, and float32 sums of squares redone in
    float64 where they would overflow or underflow. NaN anywhere gives ``(nan, nan)``.
    Sharded (FSDP2) tensors in ``after`` give the global figures on every rank: it is a
    collective then, which every rank must call.

    Args:
        before: a state dict, e.g. from :func:`capture_trainable`.
        after: a state dict, or ``dict(model.named_parameters())`` to measure a live model
            without copying it. Only names of ``before`` found in ``after`` count.

    Returns:
        ``(l2, max_abs)`` as Python floats; ``(0.0, 0.0)`` when nothing is compared.

    Raises:
        ValueError: a shape mismatch (naming the key and both shapes), or a ``meta`` tensor.

    >>> import torch
    >>> weight_delta({"w": torch.zeros(2)}, {"w": torch.tensor([3.0, -4.0])})
    (5.0, 4.0)
    """
    pairs = [(k, b, after[k]) for k, b in before.items() if k in after]
    _check_shapes("weight_delta", pairs)
    meta = [k for k, b, a in pairs if b.is_meta or a.is_meta]
    if meta:
        raise ValueError(f"weight_delta: no values to compare ('meta' tensors) for {_keys(meta)}")
    return _measure(_plan([b for _, b, _ in pairs], [a for _, _, a in pairs]))


CHUNK = 1 << 18
"""Elements per chunk of :func:`weight_delta`: 1 MiB of float32, which stays in cache."""


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Consecutive runs of pairs of at most CHUNK elements (a bigger tensor is a run alone)."""
    run: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for b, a in pairs:
        if run and size + a.numel() > CHUNK:
            yield run, size
            run, size = [], 0
        run.append((b, a))
        size += a.numel()
    if run:
        yield run, size


class _Run(NamedTuple):
    """A run of tensor pairs measured together: ``afters`` gathered into ``diff``, minus
    ``before``: one 1-D view when the befores lie back to back, else (slice of ``diff``,
    before) pairs, one subtraction each."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    afters: list[torch.Tensor]
    before: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]
    diff: torch.Tensor


def _shape(t: torch.Tensor) -> torch.Size:
    """The shape fieldkit works with: a sharded tensor's local shard's."""
    return sharding.local(t).shape


def _check_shapes(fn: str, pairs, sides: tuple[str, str] = ("before", "after")) -> None:
    """One ValueError naming every ``(key, x, y)`` whose (local) shapes differ."""
    bad = [
        f"{k!r}: {sides[0]} {tuple(_shape(x))}, {sides[1]} {tuple(_shape(y))}"
        for k, x, y in pairs
        if _shape(x) != _shape(y)
    ]
    if bad:
        raise ValueError(f"{fn}: shape mismatch for " + _first(bad, sep="; "))


class _Part(NamedTuple):
    """Pairs whose local figures combine the same way: summed over the process groups
    ``over`` (sharded parameters), or taken as they are (``over == ()``). The ``fused`` pairs
    go to the C kernel in one call, the ``runs`` through torch ops."""

    over: tuple
    device: torch.device
    fused: list[tuple[torch.Tensor, torch.Tensor]]
    runs: list[_Run]


def _plan(befores: list[torch.Tensor], afters: list[torch.Tensor]) -> list[_Part]:
    pairs = [
        (sharding.groups(a), sharding.local(b), sharding.local(a))
        for b, a in zip(befores, afters, strict=True)
    ]
    # Build the kernel (once per machine) only if it has something to do: not for CUDA tensors.
    kernel = any(_kernel.fusable(b, a) for _, b, a in pairs) and _kernel.library() is not None
    parts: dict[tuple, tuple[torch.device, list, list]] = {}
    for over, b, a in pairs:
        _, fused, rest = parts.setdefault(over, (a.device, [], []))
        if a.numel():
            (fused if kernel and _kernel.fusable(b, a) else rest).append((b, a))
    return [
        _Part(over, device, fused, _runs(rest)) for over, (device, fused, rest) in parts.items()
    ]


def _runs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_Run]:
    """Group (before, after) pairs by (device, compute dtype), cut each group into runs of at
    most CHUNK elements, and give each group one scratch buffer of its largest run."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for b, a in pairs:
        wide = torch.float64 in (a.dtype, b.dtype) or not (
            a.dtype.is_floating_point and b.dtype.is_floating_point
        )
        groups.setdefault((a.device, torch.float64 if wide else torch.float32), []).append((b, a))
    runs = []
    for (device, dtype), pairs in groups.items():
        chunks = list(_chunks(pairs))
        scratch = torch.empty(max(n for _, n in chunks), dtype=dtype, device=device)
        for run, n in chunks:
            diff = scratch[:n]
            before = _span([b for b, _ in run])
            if before is None:
                slices = _views(diff, [a for _, a in run])
                before = [(d, b) for d, (b, _) in zip(slices, run, strict=True)]
            runs.append(_Run(run, [a.reshape(-1) for _, a in run], before, diff))
    return runs


def _measure(plan: list[_Part]) -> tuple[float, float]:
    """``(l2, max_abs)`` over every part; parts of sharded parameters are summed (and maxed)
    over their process groups, so every rank gets the global figures. Every rank must call it:
    it is a collective then."""
    sq, max_abs = 0.0, 0.0
    for part in plan:  # every part, on every rank, NaN or not: the collectives must match
        s, m = _partial(part.runs)
        if part.fused:  # torch ops too where the kernel has been turned off since the plan
            fused = _kernel.library() is not None
            fs, fm = _kernel.measure(part.fused) if fused else _partial(_runs(part.fused))
            s, m = s + fs, m if math.isnan(m) else max(m, fm)
        if part.over:
            s_t = torch.tensor([s], dtype=torch.float64, device=part.device)
            m_t = torch.tensor([m], dtype=torch.float64, device=part.device)
            sharding.all_reduce(s_t, m_t, part.over)
            s, m = float(s_t), float(m_t)
        sq += s
        max_abs = m if math.isnan(m) else max(max_abs, m)
    if math.isnan(sq) or math.isnan(max_abs):
        return math.nan, math.nan
    # Float32 squares can round the L2 a hair below max|Δ|, which it never is.
    return max(math.sqrt(sq), max_abs), max_abs


def _partial(runs: list[_Run]) -> tuple[float, float]:
    """This rank's sum of squares and max|Δ|, run by run: gather the ``after`` tensors into one
    small buffer (``torch.cat``), subtract ``before``, then one min/max and one sum of squares.
    A few ops per run instead of three per tensor, and the buffer stays in cache."""
    results = []  # (run, sum of squares, (min, max)), read after all are queued
    for run in runs:
        d = torch.cat(run.afters, out=run.diff)
        if isinstance(run.before, torch.Tensor):
            d.sub_(run.before.to(d.device, non_blocking=True))
        else:
            for piece, b in run.before:
                piece.sub_(b.to(d.device, non_blocking=True))
        lo_hi = torch.aminmax(d)
        results.append((run, d.square_().sum(), lo_hi))
    # Read results only after every run is queued: one device sync, not one per run.
    sq, max_abs = 0.0, 0.0
    for run, s, (lo, hi) in results:
        m = max(-float(lo), float(hi))
        if math.isnan(m) or math.isnan(float(s)):
            return math.nan, math.nan
        if run.diff.dtype == torch.float32 and (m > 1e15 or 0 < m < 1e-15):
            s = _sum_of_squares_f64(run.pairs)  # float32 squares would overflow or underflow
        sq += float(s)
        max_abs = max(max_abs, m)
    return sq, max_abs


def _sum_of_squares_f64(run: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return sum(
        float((a.to(torch.float64) - b.to(a.device, torch.float64)).square().sum()) for b, a in run
    )


def _check_alpha(fn: str, alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{fn}: alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:  # NaN fails this too
        raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def soft_update_(
    reference: Mapping[str, torch.Tensor], policy: Mapping[str, torch.Tensor], alpha: float, /
) -> None:
    """``reference ← (1 − alpha)·reference + alpha·policy``, in place, tensor by tensor.

    The soft reference update of TR-DPO and of an EMA reference. Computed in float32 (float64
    when either side is float64) and rounded once to ``reference``'s dtype; ``alpha=0`` leaves
    ``reference`` untouched and ``alpha=1`` copies ``policy`` exactly.

    Args:
        reference: the state dict to update, e.g. :attr:`LoraReferenceSnapshot.state`.
        policy: a state dict or ``dict(model.named_parameters())`` holding every name of
            ``reference``, with the same shapes.
        alpha: the weight of ``policy``, in [0, 1].

    Raises:
        ValueError: ``alpha`` outside [0, 1] (or NaN), names of ``reference`` missing from
            ``policy``, or a shape mismatch; checked before anything is written.
        TypeError: ``alpha`` is not a number.

    >>> import torch
    >>> ref = {"w": torch.zeros(2)}
    >>> soft_update_(ref, {"w": torch.tensor([1.0, -2.0])}, 0.25)
    >>> ref["w"]
    tensor([ 0.2500, -0.5000])
    """
    alpha = _check_alpha("soft_update_", alpha)
    missing = [k for k in reference if k not in policy]
    if missing:
        raise ValueError(f"soft_update_: policy has no value for {_keys(missing)}")
    _check_shapes(
        "soft_update_", [(k, r, policy[k]) for k, r in reference.items()], ("reference", "policy")
    )
    if alpha == 0.0:
        return
    with torch.no_grad():
        for name, ref in reference.items():
            new = policy[name].detach().to(ref.device)
            if alpha < 1.0:
                wide = torch.float64 in (ref.dtype, new.dtype)
                dtype = torch.float64 if wide else torch.float32
                new = ref.to(dtype).lerp(new.to(dtype), alpha)
            ref.copy_(new)
