"""Per-tensor weight deltas, and why a tensor did not move."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _sharding as sharding
from ._buffers import move, read
from ._checks import check_shapes, first

LOW_PRECISION = (torch.bfloat16, torch.float16)

CAUSES = {
    "frozen": "frozen (requires_grad=False): the optimizer cannot move it",
    "zero-init partner": (
        "its LoRA partner was all zeros (lora_B / lora_embedding_A start at zero), so its "
        "gradient is exactly zero on the first step; it moves from the second step on"
    ),
    "rounded away": (
        "{dtype} with a non-zero gradient: every update was smaller than half a unit in the "
        "last place and rounded away; keep the adapter in float32 (peft's default "
        "autocast_adapter_dtype=True) or raise the learning rate"
    ),
    "not stepped": (
        "its gradient is non-zero but its value did not change: learning rate 0, not in the "
        "optimizer's param groups, a skipped step (a grad scaler's inf check), or updates "
        "below half a unit in the last place of {dtype}"
    ),
    "no gradient": (
        "its gradient is zero or absent: it is not used in the loss, or gradients were "
        "cleared before this report (call report() before optimizer.zero_grad())"
    ),
}


@dataclass(frozen=True)
class TensorDelta:
    """One tensor's change since the snapshot.

    Attributes:
        name, shape, dtype: the parameter.
        l2, max_abs: of ``after - before``.
        rel: ``l2 / ||before||`` (``inf`` when ``before`` is all zeros and it moved).
        unchanged: the fraction of elements bit-for-bit unchanged.
        moved: ``max_abs > 0``.
        cause: for a tensor that did not move, a key of ``CAUSES`` when one can be told,
            else None.

    >>> row = TensorDelta("w", (2,), "float32", 0.0, 0.0, 0.0, 1.0, False, "frozen")
    >>> CAUSES[row.cause]
    'frozen (requires_grad=False): the optimizer cannot move it'
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    l2: float
    max_abs: float
    rel: float
    unchanged: float
    moved: bool
    cause: str | None


@dataclass(frozen=True)
class DeltaReport:
    """Per-tensor rows and the totals; ``str()`` is a table plus a diagnosis, ``to_dict()`` plain
    data for code.

    >>> import torch
    >>> before = {"a": torch.zeros(2), "b": torch.ones(2)}
    >>> report = delta_report(before, {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(2)})
    >>> [(r.name, r.l2, r.moved) for r in report.rows], report.l2
    ([('a', 5.0, True), ('b', 0.0, False)], 5.0)
    >>> print(report.diagnosis())
    1 of 2 tensor(s) did not move:
    - 'b': cause unknown
    """

    rows: tuple[TensorDelta, ...]
    l2: float
    max_abs: float

    @property
    def unmoved(self) -> list[TensorDelta]:
        return [r for r in self.rows if not r.moved]

    def diagnosis(self) -> str:
        """Which tensors did not move, grouped by the likely cause."""
        unmoved = self.unmoved
        if not unmoved:
            return f"all {len(self.rows)} tensor(s) moved"
        by_cause: dict[str | None, list[TensorDelta]] = {}
        for row in unmoved:
            by_cause.setdefault(row.cause, []).append(row)
        lines = [f"{len(unmoved)} of {len(self.rows)} tensor(s) did not move:"]
        for cause, rows in by_cause.items():
            why = CAUSES[cause].format(dtype=rows[0].dtype) if cause else "cause unknown"
            lines.append(f"- {first([repr(r.name) for r in rows], limit=4)}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"l2": self.l2, "max_abs": self.max_abs, "rows": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        width = max([len("tensor"), *(len(r.name) for r in self.rows)])
        head = (
            f"{'tensor':<{width}}  {'shape':>14}  {'dtype':>8}  {'L2':>10}  {'max|Δ|':>10}  "
            f"{'rel':>9}  {'unchanged':>9}  moved"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {str(r.shape):>14}  {r.dtype:>8}  {r.l2:>10.3e}  "
                f"{r.max_abs:>10.3e}  {r.rel:>9.2e}  {r.unchanged:>8.1%}  "
                + ("yes" if r.moved else "NO")
            )
        lines.append(f"total: L2 {self.l2:.6e}, max|Δ| {self.max_abs:.6e}")
        return "\n".join(lines) + "\n" + self.diagnosis()


def _partner(name: str) -> str | None:
    """The other LoRA factor of the same layer, if ``name`` is one."""
    for a, b in (("lora_A.", "lora_B."), ("lora_embedding_A.", "lora_embedding_B.")):
        if a in name:
            return name.replace(a, b)
        if b in name:
            return name.replace(b, a)
    return None


def _cause(after: torch.Tensor, grad_any: float, partner_zero: bool) -> str | None:
    live = isinstance(after, nn.Parameter)  # a plain tensor says nothing of flags or grads
    if live and not after.requires_grad:
        return "frozen"
    if partner_zero:
        return "zero-init partner"
    if not live:
        return None
    if not grad_any:
        return "no gradient"
    return "rounded away" if after.dtype in LOW_PRECISION else "not stepped"


def delta_report(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], /
) -> DeltaReport:
    """Per-tensor figures of ``after - before``, and the likely cause for each tensor that did
    not move.

    Args:
        before: a state dict, e.g. from :func:`capture_trainable`.
        after: ``dict(model.named_parameters())``, whose ``requires_grad`` and ``.grad`` tell the
            causes (call it before ``optimizer.zero_grad()``); or any state dict. Only names
            of ``before`` found in ``after`` count. Sharded (FSDP2) parameters give global
            figures on every rank: every rank must call it then.

    Returns:
        A :class:`DeltaReport`, rows in ``before``'s order, figures in float64.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    >>> _ = layer.bias.requires_grad_(False)  # frozen by mistake
    >>> print(delta_report(before, dict(layer.named_parameters())).diagnosis())
    2 of 2 tensor(s) did not move:
    - 'weight': its gradient is zero or absent: ...
    - 'bias': frozen (requires_grad=False): the optimizer cannot move it
    """
    names = [n for n in before if n in after]
    check_shapes("delta_report", [(n, before[n], after[n]) for n in names])
    # Per tensor, this rank's sums (squares of Δ, squares of before, equal elements) and maxima
    # (|Δ|, a non-zero gradient), on its device, read back all at once; then combined over the
    # shards with the elements and a non-zero LoRA partner.
    partners = [_partner(name) for name in names]
    figures, nonzero, parts = [], {}, {}
    for i, (name, partner) in enumerate(zip(names, partners, strict=True)):
        a = sharding.local(after[name])
        b = move(sharding.local(before[name]), a.device)
        wide = torch.float32 if a.device.type == "mps" else torch.float64  # MPS has no float64
        a, b = a.to(wide), b.to(wide)
        d = a - b
        grad = after[name].grad if isinstance(after[name], nn.Parameter) else None
        none = a.new_zeros(())
        figures.append(
            torch.stack(
                [
                    d.square().sum(),
                    b.square().sum(),
                    (a == b).sum().to(wide),
                    d.abs().max() if d.numel() else none,
                    none if grad is None else sharding.local(grad).any().to(wide),
                ]
            )
        )
        if partner in before and partner not in nonzero:
            nonzero[partner] = sharding.local(before[partner]).any()
        parts.setdefault(sharding.groups(after[name]), []).append(i)
    values = read(figures + list(nonzero.values()))
    nonzero = dict(zip(nonzero, values[len(names) :], strict=True))
    sums, maxima = [], []
    for name, partner, (sq_d, sq_b, equal, mx, grad_any) in zip(
        names, partners, values[: len(names)], strict=True
    ):
        sums.append([sq_d, sq_b, equal, sharding.local(after[name]).numel()])
        maxima.append([mx, grad_any, float(partner not in nonzero or nonzero[partner][0])])
    sums_t = torch.tensor(sums, dtype=torch.float64)
    maxima_t = torch.tensor(maxima, dtype=torch.float64)
    for over, idx in parts.items():
        if over:
            device = sharding.reduce_device(over, sharding.local(after[names[idx[0]]]).device)
            s, m = sums_t[idx].to(device), maxima_t[idx].to(device)
            sharding.all_reduce(s, m, over)
            sums_t[idx], maxima_t[idx] = s.cpu(), m.cpu()
    rows, sq, max_abs = [], 0.0, 0.0
    for name, (sq_d, sq_b, equal, numel), (mx, grad_any, partner_any) in zip(
        names, sums_t.tolist(), maxima_t.tolist(), strict=True
    ):
        l2, norm0 = math.sqrt(sq_d), math.sqrt(sq_b)
        moved = mx > 0 or math.isnan(mx)
        cause = None if moved else _cause(after[name], grad_any, partner_any == 0.0)
        rows.append(
            TensorDelta(
                name,
                tuple(sharding.full_shape(after[name])),
                str(after[name].dtype).removeprefix("torch."),
                l2,
                mx,
                l2 / norm0 if norm0 else (math.inf if l2 else 0.0),
                equal / numel if numel else 1.0,
                moved,
                cause,
            )
        )
        sq += sq_d
        max_abs = max(max_abs, mx)
    return DeltaReport(tuple(rows), math.sqrt(sq), max_abs)
