"""Flat buffers: tensors packed back to back, one buffer per (device, dtype), so that a whole
group moves between host and device in one copy, and views back into them."""

from __future__ import annotations

import torch
from torch._utils import _unflatten_dense_tensors

Pack = tuple[torch.device, torch.Tensor, list[int]]
"""(target device, one flat buffer, the indices of the tensors that are views into it)."""

_reading: dict[int, list] = {}
"""Host storage address -> CUDA events of copies queued out of it that may still read it. A
CPU write through :func:`copy_all` (the one write path into a snapshot's memory) waits for
them, however many entries, on however many streams, queued them."""


def note_reads(flat: torch.Tensor, device: torch.device) -> None:
    """Record that a copy out of host ``flat`` was just queued on ``device``'s current stream."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    key = flat.untyped_storage().data_ptr()
    _reading[key] = [e for e in _reading.get(key, ()) if not e.query()] + [event]


def wait_reads(tensors: list[torch.Tensor]) -> None:
    """Wait for every queued copy that may still read the host storage of ``tensors``."""
    if not _reading:  # no copy was ever queued out of host memory: nothing to wait for
        return
    for key in {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}:
        for event in _reading.pop(key, ()):
            event.synchronize()


def host_empty(like: torch.Tensor, *, pin: bool | None = None) -> torch.Tensor:
    """An uninitialised CPU tensor in ``like``'s shape, dtype and, where ``like`` is dense, its
    strides (a swap keeps the layout); pinned (unless ``pin=False``: a copy that is packed
    again later) when ``like`` lives on CUDA, so that copies to and from it can overlap."""
    pin = like.device.type == "cuda" if pin is None else pin
    with torch.inference_mode(False):  # kept and written later, outside inference mode too
        if not dense(like):
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
        return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, pin_memory=pin)


def span(tensors: list[torch.Tensor], *, align: bool = False) -> torch.Tensor | None:
    """The 1-D view that covers ``tensors`` when they lie in order in one storage exactly as
    :func:`packed` lays them out (back to back, or with ``align`` at :data:`ALIGN`-byte
    offsets); otherwise None."""
    if not tensors:
        return None
    head = tensors[0]
    storage, start = head.untyped_storage().data_ptr(), head.storage_offset()
    at = offsets(tensors, align)
    for t, offset in zip(tensors, at, strict=False):
        if (
            t.dtype != head.dtype
            or t.device != head.device
            or not t.is_contiguous()
            or t.storage_offset() != start + offset
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
    flat = head.new_empty(0)
    return flat.set_(head.untyped_storage(), start, (at[-1],))


ALIGN = 256
"""Bytes: with ``align``, each packed view starts this far apart from its buffer's start at
least, as a tensor of its own would. cuBLASLt picks its algorithms by pointer alignment and
Inductor copies misaligned inputs, so a view at an odd offset could round a matmul otherwise."""


def offsets(like: list[torch.Tensor], align: bool) -> list[int]:
    """Where each of ``like`` starts in a flat buffer, in elements, and (last) its length."""
    out, at = [], 0
    for t in like:
        if align:
            step = max(1, ALIGN // t.element_size())
            at = -(-at // step) * step
        out.append(at)
        at += t.numel()
    return out + [at]


def groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of ``tensors`` by (device, dtype), in order."""
    found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        found.setdefault((t.device, t.dtype), []).append(i)
    return found


def move(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: non-blocking towards an accelerator (from pinned memory the copy
    overlaps), blocking towards the CPU, whose reads would not wait for a queued copy."""
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for every pair, waiting once per CUDA device read instead of once per
    tensor: copies from CUDA to the CPU are queued non-blocking (into pinned memory they
    overlap), then each source device's current stream, which ran them, is waited on before
    any CPU reader can see a destination. A CPU destination that a queued copy may still be
    reading (:func:`note_reads`) is waited for first."""
    wait_reads(dsts)
    waits = set()
    for dst, src in zip(dsts, srcs, strict=True):
        to_host = src.device.type == "cuda" and dst.device.type == "cpu"
        dst.copy_(src.detach(), non_blocking=to_host)
        if to_host:
            waits.add(src.device)
    for device in waits:
        torch.cuda.current_stream(device).synchronize()


def join_default(devices: list[torch.device]) -> None:
    """Make each CUDA device's current stream, where a swap is queued, wait for its default
    stream, where the optimizer steps and the policy's forward run (a no-op on the default
    stream itself)."""
    for device in devices:
        current = torch.cuda.current_stream(device)
        if current != torch.cuda.default_stream(device):
            current.wait_stream(torch.cuda.default_stream(device))


def rejoin_default(devices: list[torch.device]) -> None:
    """Make each CUDA device's default stream wait for its current stream (the restore queued
    there): later work on the default stream sees the live weights back."""
    for device in devices:
        current = torch.cuda.current_stream(device)
        if current != torch.cuda.default_stream(device):
            torch.cuda.default_stream(device).wait_stream(current)


def read(tensors: list[torch.Tensor]) -> list[list]:
    """Each tensor's values as a flat Python list, in one device-to-host read per (device,
    dtype) for all of them: one sync, not one per tensor."""
    out: list[list] = [[] for _ in tensors]
    for idx in groups(tensors).values():
        values = torch.cat([tensors[i].reshape(-1) for i in idx]).tolist()
        at = 0
        for i in idx:
            out[i] = values[at : at + tensors[i].numel()]
            at += tensors[i].numel()
    return out


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive slots in some order of its
    dimensions (contiguous, transposed, channels-last): a layout a flat buffer can copy."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def views(
    flat: torch.Tensor, like: list[torch.Tensor], *, strided: bool = False, align: bool = False
) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, laid out as :func:`offsets` says (one C++ call);
    with ``strided``, each dense tensor of ``like`` is matched in its strides too (a transposed
    view stays transposed), since a matmul rounds differently on another layout."""
    at = offsets(like, align)
    if at[-1] == sum(t.numel() for t in like):  # back to back
        out = list(_unflatten_dense_tensors(flat, like))
    else:  # padding between them, as shapeless placeholders
        shapes, real, end = [], [], 0
        for t, o in zip(like, at, strict=False):
            if o > end:
                shapes.append(torch.empty(o - end, device="meta"))
            real.append(len(shapes))
            shapes.append(t)
            end = o + t.numel()
        every = _unflatten_dense_tensors(flat, shapes)
        out = [every[i] for i in real]
    for i, t in enumerate(like):
        if not t.numel():  # torch < 2.7 views every empty shape as 1-D
            out[i] = out[i].view(t.shape)
        elif strided and not t.is_contiguous() and dense(t):
            out[i] = out[i].as_strided(t.shape, t.stride())
    return out


def packed(
    likes: list[torch.Tensor], *, on_host: bool, strided: bool = False, align: bool = False
) -> tuple[list[torch.Tensor], list[Pack]]:
    """Uninitialised tensors shaped like ``likes`` (and strided like them, with ``strided``):
    views into one buffer per (device, dtype) of ``likes`` (at :data:`ALIGN`-byte offsets, with
    ``align``), on that device, or on the CPU when ``on_host`` (pinned for CUDA, so that each
    buffer moves to its device in one non-blocking copy)."""
    out: list[torch.Tensor] = [None] * len(likes)  # type: ignore[list-item]
    packs: list[Pack] = []
    # Kept and written later: never inference tensors, even when made in inference mode.
    with torch.inference_mode(False):
        for (device, dtype), idx in groups(likes).items():
            like = [likes[i] for i in idx]
            flat = torch.empty(
                offsets(like, align)[-1],
                dtype=dtype,
                device="cpu" if on_host else device,
                pin_memory=on_host and device.type == "cuda",
            )
            for i, view in zip(idx, views(flat, like, strided=strided, align=align), strict=True):
                out[i] = view
            packs.append((device, flat, idx))
    return out, packs


def pack(
    values: list[torch.Tensor], likes: list[torch.Tensor], *, strided: bool = False, align=False
) -> tuple[list[torch.Tensor], list[Pack]]:
    """CPU copies of ``values``, packed as :func:`packed` lays out ``likes``."""
    out, packs = packed(likes, on_host=True, strided=strided, align=align)
    copy_all(out, values)
    return out, packs


def packer(packs: list[Pack]):
    """A load's ``into``: CPU views packed as a snapshot packs them (aligned, strided, pinned
    for CUDA), their packs added to ``packs``, so that a file is read straight into them."""

    def into(likes: list[torch.Tensor]) -> list[torch.Tensor]:
        values, made = packed(likes, on_host=True, strided=True, align=True)
        packs.extend(made)
        return values

    return into


def stage(values: list[torch.Tensor], packs: list[Pack]) -> list[torch.Tensor]:
    """``values`` with every pack (aligned, as the snapshot's) that lives elsewhere moved to its
    device in one (non-blocking, from pinned memory) copy."""
    out = list(values)
    for device, flat, idx in packs:
        if flat.device != device:
            moved = views(move(flat, device), [values[i] for i in idx], strided=True, align=True)
            if device.type == "cuda":
                note_reads(flat, device)
            for i, v in zip(idx, moved, strict=True):
                out[i] = v
    return out


def to_devices(values: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each value on its parameter's device, in its parameter's layout: used in place when
    already so, otherwise copied (non-blocking from pinned memory), in one copy per group
    packed back to back."""
    out = [
        torch.empty_like(p).copy_(v) if v.device == p.device and _relaid(v, p) else v
        for v, p in zip(values, params, strict=True)
    ]
    moving = [i for i, (v, p) in enumerate(zip(out, params, strict=True)) if v.device != p.device]
    packs: list[Pack] = []
    for (device, _), idx in groups([params[i] for i in moving]).items():
        idx = [moving[i] for i in idx]
        flat = span([out[i] for i in idx], align=True)
        if flat is not None:
            packs.append((device, flat, idx))
            continue
        for i in idx:
            out[i] = move(out[i], device)
    return stage(out, packs)


def _relaid(value: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``value`` must be copied into ``param``'s layout for a bit-exact swap."""
    return value.stride() != param.stride() and value.numel() > 1 and dense(param)
