"""What every entry point checks before it touches anything, and how its errors name things."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import _sharding as sharding
from ._guards import Held
from ._names import first, keys

StateDict = dict[str, torch.Tensor]
"""A plain state dict: parameter name (as ``named_parameters()`` spells it) to tensor."""


def _unusable(param: torch.Tensor) -> str | None:
    if param.is_meta:
        return (
            "on the 'meta' device (offloaded by accelerate, or never materialised); "
            "keep the adapter's parameters on a real device (e.g. a device_map that does not "
            "offload them to 'cpu'/'disk')"
        )
    return sharding.unusable(param)


def check_usable(fn: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise one ValueError naming every parameter fieldkit cannot read or swap."""
    problems: dict[str, list[str]] = {}
    for name, param in named:
        why = _unusable(param)
        if why is not None:
            problems.setdefault(why, []).append(name)
    if problems:
        lines = [f"parameter(s) {keys(names)} are {why}" for why, names in problems.items()]
        raise ValueError(f"{fn}: " + ". ".join(lines) + ". Nothing was changed.")


def trainable(fn: str, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, local tensor)`` of every trainable parameter, each checked to be usable."""
    found = [(n, p) for n, p in sharding.named_parameters(model).items() if p.requires_grad]
    check_usable(fn, found)
    Held.refuse_reads(fn, [p for _, p in found])
    return [(name, sharding.local(param)) for name, param in found]


def shape(t: torch.Tensor) -> torch.Size:
    """The shape fieldkit works with: a sharded tensor's local shard's."""
    return sharding.local(t).shape


def check_shapes(fn: str, pairs, sides: tuple[str, str] = ("before", "after")) -> None:
    """One ValueError naming every ``(key, x, y)`` whose (local) shapes differ; refused too
    when a parameter among them is swapped in (its values are the reference's now)."""
    pairs = list(pairs)
    Held.refuse_reads(fn, (t for _, x, y in pairs for t in (x, y)))  # walked only while swapped
    bad = [
        f"{k!r}: {sides[0]} {tuple(shape(x))}, {sides[1]} {tuple(shape(y))}"
        for k, x, y in pairs
        if shape(x) != shape(y)
    ]
    if bad:
        raise ValueError(f"{fn}: shape mismatch for " + first(bad, sep="; "))


def check_alpha(fn: str, alpha: float) -> float:
    """``alpha`` as a float in [0, 1], or a TypeError / ValueError naming ``fn``.

    >>> check_alpha("update_", 1)
    1.0
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{fn}: alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:  # NaN fails this too
        raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)
