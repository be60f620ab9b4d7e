"""How every error names things: a leaf module, imported by all the others."""

from __future__ import annotations

from collections.abc import Iterable


def first(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and how many more were cut."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... (+{len(items) - limit} more)" if len(items) > limit else "")


def keys(names: Iterable[str], limit: int = 8) -> str:
    """Names ``repr``'d and sorted, long lists cut.

    >>> keys(["b", "a", "c"], limit=2)
    "'a', 'b', ... (+1 more)"
    """
    return first([repr(n) for n in sorted(names)], limit)
