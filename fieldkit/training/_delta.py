"""The delta engine: L2 and max|Δ| between two lists of tensors, planned once and measured
many times.

A :class:`DeltaPlan` sorts the pairs into parts (by the process groups their local figures are
combined over), sends contiguous CPU pairs to the fused C kernel (``_delta.c``, loaded by
``_kernel``) and cuts the rest into runs for torch ops. :func:`weight_delta` plans and measures
once; :class:`WeightDeltaTracker` plans once and measures every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from . import _kernel
from . import _sharding as sharding
from ._buffers import move, read, span, views
from ._checks import check_shapes, keys

CHUNK = 1 << 18
"""Elements per run of the torch-ops path: 1 MiB of float32, which stays in cache."""


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Consecutive runs of pairs of at most CHUNK elements in all (a bigger tensor is cut)."""
    run: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for b, a in (piece for pair in pairs for piece in _pieces(*pair)):
        if run and size + a.numel() > CHUNK:
            yield run, size
            run, size = [], 0
        run.append((b, a))
        size += a.numel()
    if run:
        yield run, size


def _pieces(b: torch.Tensor, a: torch.Tensor):
    """``(b, a)`` as views of at most CHUNK elements each, cut along the leading dimension(s),
    so that no scratch buffer need be as large as the largest tensor."""
    if a.numel() <= CHUNK:
        yield b, a
        return
    inner = math.prod(a.shape[1:])
    if inner > CHUNK:
        for i in range(a.shape[0]):
            yield from _pieces(b[i], a[i])
        return
    step = CHUNK // inner
    for i in range(0, a.shape[0], step):
        yield b[i : i + step], a[i : i + step]


class _Run(NamedTuple):
    """A run of tensor pairs measured together: ``afters`` gathered into ``diff``, minus
    ``before``: one 1-D view when the befores lie back to back, else (slice of ``diff``,
    before) pairs, one subtraction each. ``afters`` are flat views, made once, except at the
    indices ``strided``: a non-contiguous tensor has no flat view (``reshape`` would copy it
    once, and the plan would read that stale copy forever), so it is flattened at each
    measure."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    afters: list[torch.Tensor]
    strided: tuple[int, ...]
    before: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]
    diff: torch.Tensor


class _Part(NamedTuple):
    """Pairs whose local figures combine the same way: summed over the process groups
    ``over`` (sharded parameters), or taken as they are (``over == ()``). The ``fused`` pairs
    go to the C kernel in one call, the ``runs`` through torch ops."""

    over: tuple
    device: torch.device
    fused: list[tuple[torch.Tensor, torch.Tensor]]
    runs: list[_Run]


class DeltaPlan:
    """``(l2, max_abs)`` of ``afters - befores``, planned once: :meth:`measure` re-reads the
    tensors each call. The plan holds views of both sides' storage, so it must be made again
    when a tensor is re-pointed or replaced."""

    def __init__(self, befores: list[torch.Tensor], afters: list[torch.Tensor]):
        pairs = [
            (sharding.groups(a), sharding.local(b), sharding.local(a))
            for b, a in zip(befores, afters, strict=True)
        ]
        # Build the kernel (once per machine) only if it has something to do: not for CUDA.
        kernel = any(_kernel.fusable(b, a) for _, b, a in pairs) and _kernel.library() is not None
        parts: dict[tuple, tuple[torch.device, list, list]] = {}
        for over, b, a in pairs:
            _, fused, rest = parts.setdefault(over, (a.device, [], []))
            if a.numel():
                (fused if kernel and _kernel.fusable(b, a) else rest).append((b, a))
        # The scratch and its views are written at every measure, in inference mode or out of
        # it: never make them inference tensors.
        with torch.inference_mode(False):
            self.parts = [
                _Part(over, device, fused, _runs(rest))
                for over, (device, fused, rest) in parts.items()
            ]

    def measure(self) -> tuple[float, float]:
        """``(l2, max_abs)`` over every part; parts of sharded parameters are summed (and
        maxed) over their process groups, so every rank gets the global figures. Every rank
        must call it: it is a collective then."""
        sq, max_abs = 0.0, 0.0
        for part in self.parts:  # every part, on every rank, NaN or not: collectives must match
            s, m = _partial(part.runs)
            if part.fused:  # torch ops too where the kernel has been turned off since the plan
                fused = _kernel.library() is not None
                fs, fm = _kernel.measure(part.fused) if fused else _partial(_runs(part.fused))
                s, m = s + fs, m if math.isnan(m) else max(m, fm)
            if part.over:
                device = sharding.reduce_device(part.over, part.device)
                s_t = torch.tensor([s], dtype=torch.float64, device=device)
                m_t = torch.tensor([m], dtype=torch.float64, device=device)
                sharding.all_reduce(s_t, m_t, part.over)
                s, m = float(s_t), float(m_t)
            sq += s
            max_abs = m if math.isnan(m) else max(max_abs, m)
        if math.isnan(sq) or math.isnan(max_abs):
            return math.nan, math.nan
        # Float32 squares can round the L2 a hair below max|Δ|, which it never is.
        return max(math.sqrt(sq), max_abs), max_abs


def _runs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_Run]:
    """Group (before, after) pairs by (device, compute dtype), cut each group into runs of at
    most CHUNK elements, and give each group one scratch buffer of its largest run."""
    kinds: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for b, a in pairs:
        wide = torch.float64 in (a.dtype, b.dtype) or not (
            a.dtype.is_floating_point and b.dtype.is_floating_point
        )
        kinds.setdefault((a.device, torch.float64 if wide else torch.float32), []).append((b, a))
    runs = []
    for (device, dtype), pairs in kinds.items():
        chunks = list(_chunks(pairs))
        scratch = torch.empty(max(n for _, n in chunks), dtype=dtype, device=device)
        for run, n in chunks:
            diff = scratch[:n]
            before = span([b for b, _ in run])
            if before is None:
                slices = views(diff, [a for _, a in run])
                before = [(d, b) for d, (b, _) in zip(slices, run, strict=True)]
            strided = tuple(i for i, (_, a) in enumerate(run) if not a.is_contiguous())
            afters = [a if i in strided else a.view(-1) for i, (_, a) in enumerate(run)]
            runs.append(_Run(run, afters, strided, before, diff))
    return runs


def _partial(runs: list[_Run]) -> tuple[float, float]:
    """This rank's sum of squares and max|Δ|, run by run: gather the ``after`` tensors into one
    small buffer (``torch.cat``), subtract ``before``, then one min/max and one sum of squares.
    A few ops per run instead of three per tensor, and the buffer stays in cache."""
    results = []  # per run: sum of squares, -min, max; read after all are queued
    for run in runs:
        afters = run.afters
        if run.strided:
            afters = [a.reshape(-1) if i in run.strided else a for i, a in enumerate(afters)]
        d = torch.cat(afters, out=run.diff)
        if isinstance(run.before, torch.Tensor):
            d.sub_(move(run.before, d.device))
        else:
            for piece, b in run.before:
                piece.sub_(move(b, d.device))
        lo, hi = torch.aminmax(d)
        results.append(torch.stack([d.square_().sum(), -lo, hi]).double())
    sq, max_abs = 0.0, 0.0
    # One device-to-host read per device for every run, after all are queued: one sync, not
    # one per run.
    for run, (s, m_lo, m_hi) in zip(runs, read(results), strict=True):
        m = max(m_lo, m_hi)
        if math.isnan(m) or math.isnan(s):
            return math.nan, math.nan
        if run.diff.dtype == torch.float32 and (m > 1e15 or 0 < m < 1e-15):
            s = _sum_of_squares_f64(run.pairs)  # float32 squares would overflow or underflow
        sq += s
        max_abs = max(max_abs, m)
    return sq, max_abs


def _sum_of_squares_f64(run: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return sum(
        float((a.to(torch.float64) - b.to(a.device, torch.float64)).square().sum()) for b, a in run
    )


def weight_delta(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], /
) -> tuple[float, float]:
    """L2 norm and max absolute value of ``after - before`` over all tensors together.

    Differences in float32 (float64 when either side is float64 or not a float). Contiguous CPU
    pairs of one dtype, float32 or bfloat16, go to a fused C kernel (``_kernel``): one pass,
    float64 sums, no extra tensor memory. The rest go through torch ops in runs of at most
    ``CHUNK`` elements (a bigger tensor is cut into runs): a few ops per run rather than per
    tensor, extra memory one buffer of at most ``CHUNK`` elements per (device, dtype), and
    float32 sums of squares redone in float64 where they would overflow or underflow. NaN
    anywhere gives ``(nan, nan)``. Sharded (FSDP2) tensors in ``after`` give the global figures
    on every rank: it is a collective then, which every rank must call.

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
    check_shapes("weight_delta", pairs)
    meta = [k for k, b, a in pairs if b.is_meta or a.is_meta]
    if meta:
        raise ValueError(f"weight_delta: no values to compare ('meta' tensors) for {keys(meta)}")
    return DeltaPlan([b for _, b, _ in pairs], [a for _, _, a in pairs]).measure()


def weight_delta_path() -> str:
    """Which path :func:`weight_delta` and :class:`WeightDeltaTracker` take for CPU tensors, and
    why: ``"fused C kernel (<library>)"``, or ``"torch ops (<reason>)"`` where the kernel is
    turned off (``FIELDKIT_NO_KERNEL=1``) or could not be built. Builds the kernel if it has
    not been built yet. CUDA tensors always take torch ops.

    >>> weight_delta_path().startswith(("fused C kernel", "torch ops"))
    True
    """
    return _kernel.status()
