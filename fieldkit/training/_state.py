"""Pure functions over plain state dicts: capture, swap in, restore, measure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

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
    if type(param.data) is not torch.Tensor:
        return (
            f"a {type(param.data).__name__}, not a plain tensor; sharded or quantized "
            "parameters are not supported"
        )
    return None


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
        ValueError: a trainable parameter is on the ``meta`` device (offloaded) or is not a
            plain tensor; the message names them.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> state = capture_trainable(layer)
    >>> sorted(state), state["weight"].device.type
    (['bias', 'weight'], 'cpu')
    >>> state["weight"].data_ptr() != layer.weight.data_ptr()
    True
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _check_usable("capture_trainable", trainable)
    return {name: _host_copy(param, like=param) for name, param in trainable}


def _bind(fn: str, model: nn.Module, state: Mapping[str, torch.Tensor], arg: str):
    """Check ``state`` against ``model`` completely and pair each value with its parameter."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{fn}: {arg} must be a mapping of name -> Tensor, got {type(state).__name__}"
        )
    params = dict(model.named_parameters())
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
    mismatched = [
        f"{k!r}: {arg} has {tuple(v.shape)} {v.dtype}, the model has "
        f"{tuple(params[k].shape)} {params[k].dtype}"
        for k, v in sorted(state.items())
        if v.shape != params[k].shape or v.dtype != params[k].dtype
    ]
    if mismatched:
        raise ValueError(
            f"{fn}: shape or dtype mismatch for {len(mismatched)} key(s): "
            + _first(mismatched, sep="; ")
            + ". Nothing was changed."
        )
    bound = [(k, params[k], v) for k, v in state.items()]
    _check_usable(fn, [(k, p) for k, p, _ in bound])
    meta_values = [k for k, _, v in bound if v.is_meta]
    if meta_values:
        raise ValueError(f"{fn}: {arg} holds 'meta' tensors (no values) for {_keys(meta_values)}")
    return bound


def _assign(fn: str, model: nn.Module, state: Mapping[str, torch.Tensor], arg: str) -> StateDict:
    bound = _bind(fn, model, state, arg)
    # Stage every value on its parameter's device before touching the model, so a failed copy
    # (out of memory, say) leaves the model untouched.
    staged = [(k, p, v.detach().to(p.device, non_blocking=True)) for k, p, v in bound]
    displaced: StateDict = {}
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, param, value in staged:
            displaced[name] = param.data
            done.append((param, displaced[name]))
            # Re-pointing `.data` leaves the parameter object, its requires_grad and its
            # autograd version counter alone, so a pending backward stays valid.
            param.data = value
    except BaseException:
        for param, old in reversed(done):
            param.data = old
        raise
    return displaced


def swap_in(model: nn.Module, state: Mapping[str, torch.Tensor], /) -> StateDict:
    """Put ``state``'s values into the live parameters of the same names.

    The swap re-points each parameter's ``.data``: parameter objects, ``requires_grad``, the
    optimizer's references and the autograd version counters are untouched, so it is safe
    between a policy forward and its ``backward()`` once :func:`restore` has run. Values already
    on the parameter's device are used in place (no copy): don't modify ``state`` while swapped
    in. Values on another device are copied there (non-blocking from pinned memory).

    Args:
        model: the live model.
        state: name -> tensor, keyed by ``named_parameters()`` names; a subset is fine. Shapes
            and dtypes must equal the live parameters'.

    Returns:
        ``displaced``: the live tensors that were swapped out, for :func:`restore`.

    Raises:
        ValueError: unknown names, shape or dtype mismatches, offloaded (``meta``) or sharded
            parameters. All-or-nothing: everything is checked before anything is written, and
            after any error the model holds exactly what it held before.
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
    return _assign("swap_in", model, state, "state")


def restore(model: nn.Module, displaced: Mapping[str, torch.Tensor], /) -> None:
    """Undo :func:`swap_in`: put the displaced tensors back, bit for bit.

    The original storage is re-attached, not copied back, so the restore is exact by
    construction and every parameter is the same object it was.

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
    _assign("restore", model, displaced, "displaced")


def weight_delta(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], /
) -> tuple[float, float]:
    """L2 norm and max absolute value of ``after - before`` over all tensors together.

    Computed tensor by tensor, in float32 (float64 when either side is float64 or not a float),
    with the sum of squares accumulated in float64: extra memory is bounded by one tensor.

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
    bad_shapes = [
        f"{k!r}: before {tuple(b.shape)}, after {tuple(a.shape)}"
        for k, b, a in pairs
        if b.shape != a.shape
    ]
    if bad_shapes:
        raise ValueError("weight_delta: shape mismatch for " + _first(bad_shapes, sep="; "))
    meta = [k for k, b, a in pairs if b.is_meta or a.is_meta]
    if meta:
        raise ValueError(f"weight_delta: no values to compare ('meta' tensors) for {_keys(meta)}")
    partial: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _, b, a in pairs:
        if a.numel() == 0:
            continue
        a = a.detach()
        wide = torch.float64 in (a.dtype, b.dtype) or not (
            a.dtype.is_floating_point and b.dtype.is_floating_point
        )
        dtype = torch.float64 if wide else torch.float32
        diff = a.to(dtype) - b.detach().to(device=a.device, dtype=dtype)
        partial.append(
            (
                torch.linalg.vector_norm(diff, dtype=torch.float64).square(),
                diff.abs().max(),
            )
        )
    # Read results only after every tensor is queued: one device sync, not one per tensor.
    sq = sum(float(s) for s, _ in partial)
    max_abs = max((float(m) for _, m in partial), default=0.0)
    return math.sqrt(sq), max_abs
