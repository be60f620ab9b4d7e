"""WeightDeltaTracker: did training move the weights, and by how much."""

from __future__ import annotations

from torch import nn

from ._state import capture_trainable, weight_delta


class WeightDeltaTracker:
    """Snapshot the trainable parameters now; ``delta()`` measures how far they moved since.

    The snapshot is a CPU copy of every parameter with ``requires_grad=True`` at construction.
    ``delta()`` re-reads the live model (copying nothing) and returns the aggregate L2 norm and
    max absolute value of the change over the captured tensors. Tensors that became trainable
    later are ignored; ``(0.0, 0.0)`` when nothing was captured.

    Args:
        model: the live model.

    Raises:
        ValueError: a trainable parameter is offloaded (``meta``) or sharded.

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
        self._before = capture_trainable(model)

    def delta(self) -> tuple[float, float]:
        """``(l2, max_abs)`` of the live trainable weights minus the snapshot."""
        return weight_delta(self._before, dict(self._model.named_parameters()))

    def __len__(self) -> int:
        return len(self._before)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._before.values())
        return f"WeightDeltaTracker(tensors={len(self)}, params={numel:,})"
