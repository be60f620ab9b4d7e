"""Flat buffers: tensors packed back to back, one buffer per (device, dtype), so that a whole
group moves between host and device in one copy, and views back into them."""

from __future__ import annotations

import torch
from torch._utils import _unflatten_dense_tensors

Pack = tuple[torch.device, torch.Tensor, list[int]]
"""(target device, one flat buffer, the indices of the tensors that are views into it)."""


def host_copy(tensor: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy in ``like``'s dtype; pinned when ``like`` lives on CUDA, so the
    copy to the device can be non-blocking."""
    out = torch.empty(
        tensor.shape, dtype=like.dtype, device="cpu", pin_memory=like.device.type == "cuda"
    )
    return out.copy_(tensor.detach())


def span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D view that covers ``tensors`` when they lie back to back, in order, in one
    storage (as packed by :func:`pack`); otherwise None."""
    if not tensors:
        return None
    head = tensors[0]
    storage, offset = head.untyped_storage().data_ptr(), head.storage_offset()
    for t in tensors:
        if (
            t.dtype != head.dtype
            or t.device != head.device
            or not t.is_contiguous()
            or t.storage_offset() != offset
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        offset += t.numel()
    flat = head.new_empty(0)
    return flat.set_(
        head.untyped_storage(), head.storage_offset(), (offset - head.storage_offset(),)
    )


def groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of ``tensors`` by (device, dtype), in order."""
    found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        found.setdefault((t.device, t.dtype), []).append(i)
    return found


def views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, back to back (one C++ call)."""
    return list(_unflatten_dense_tensors(flat, like))


def packed(likes: list[torch.Tensor], *, on_host: bool) -> tuple[list[torch.Tensor], list[Pack]]:
    """Uninitialised tensors shaped like ``likes``: views into one buffer per (device, dtype)
    of ``likes``, on that device, or on the CPU when ``on_host`` (pinned for CUDA, so that
    each buffer moves to its device in one non-blocking copy)."""
    out: list[torch.Tensor] = [None] * len(likes)  # type: ignore[list-item]
    packs: list[Pack] = []
    for (device, dtype), idx in groups(likes).items():
        flat = torch.empty(
            sum(likes[i].numel() for i in idx),
            dtype=dtype,
            device="cpu" if on_host else device,
            pin_memory=on_host and device.type == "cuda",
        )
        for i, view in zip(idx, views(flat, [likes[i] for i in idx]), strict=True):
            out[i] = view
        packs.append((device, flat, idx))
    return out, packs


def pack(
    values: list[torch.Tensor], likes: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[Pack]]:
    """CPU copies of ``values``, packed as :func:`packed` lays out ``likes``."""
    out, packs = packed(likes, on_host=True)
    for view, value in zip(out, values, strict=True):
        view.copy_(value.detach())
    return out, packs


def stage(values: list[torch.Tensor], packs: list[Pack]) -> list[torch.Tensor]:
    """``values`` with every pack that lives elsewhere moved to its device in one
    (non-blocking, from pinned memory) copy."""
    out = list(values)
    for device, flat, idx in packs:
        if flat.device != device:
            moved = views(flat.to(device, non_blocking=True), [values[i] for i in idx])
            for i, v in zip(idx, moved, strict=True):
                out[i] = v
    return out


def to_devices(values: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each value on its parameter's device: used in place when already there, otherwise
    copied (non-blocking from pinned memory), in one copy per group packed back to back."""
    out = list(values)
    moving = [
        i for i, (v, p) in enumerate(zip(values, params, strict=True)) if v.device != p.device
    ]
    packs: list[Pack] = []
    for (device, _), idx in groups([params[i] for i in moving]).items():
        idx = [moving[i] for i in idx]
        flat = span([values[i] for i in idx])
        if flat is not None:
            packs.append((device, flat, idx))
            continue
        for i in idx:
            out[i] = values[i].to(device, non_blocking=True)
    return stage(out, packs)
