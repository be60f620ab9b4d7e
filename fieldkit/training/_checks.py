"""What every entry point checks before it touches anything, and how its errors name things."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import _sharding as sharding

StateDict = dict[str, torch.Tensor]
"""A plain state dict: parameter name (as ``named_parameters()`` spells it) to tensor."""


def first(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and how many more were cut."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... (+{len(items) - limit} more)" if len(items) > limit else "")


def keys(names: Iterable[str], limit: int = 8) -> str:
    """Names ``repr``'d and sorted, long lists cut: how every error names keys.

    >>> keys(["b", "a", "c"], limit=2)
    "'a', 'b', ... (+1 more)"
    """
    return first([repr(n) for n in sorted(names)], limit)


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
    return [(name, sharding.local(param)) for name, param in found]


def shape(t: torch.Tensor) -> torch.Size:
    """The shape fieldkit works with: a sharded tensor's local shard's."""
    return sharding.local(t).shape


def check_shapes(fn: str, pairs, sides: tuple[str, str] = ("before", "after")) -> None:
    """One ValueError naming every ``(key, x, y)`` whose (local) shapes differ."""
    bad = [
        f"{k!r}: {sides[0]} {tuple(shape(x))}, {sides[1]} {tuple(shape(y))}"
        for k, x, y in pairs
        if shape(x) != shape(y)
    ]
    if bad:
        raise ValueError(f"{fn}: shape mismatch for " + first(bad, sep="; "))


def check_alpha(fn: str, alpha: float) -> float:
    """``alpha`` as a float in [0, 1], or a TypeError / ValueError naming ``fn``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{fn}: alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:  # NaN fails this too
        raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)
