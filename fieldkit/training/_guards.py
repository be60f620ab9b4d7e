"""What a swap must never get wrong, checked where it costs least.

- :class:`Readers`: a swap changes only what the forward reads. Per bound parameter, the peft
  layers on its path and the adapter it belongs to are found once; every swap in checks that
  none of those layers is merged or disabled and that the adapter is active.
- :func:`forget_casts`: torch's autocast caches each parameter's low-precision copy per
  parameter *object*, which a swap keeps; the cache is cleared on entry and on exit.
- :func:`written`: autograd's version counters tell which parameters were written in place
  while swapped in (an in-place op inside ``with snap:``).
- :class:`Held`: every swapped parameter is registered while it is swapped, and one global
  optimizer step pre-hook refuses a step that would write into one, before it writes (fused
  optimizers move no version counter). It costs one dict truth test per step while nothing is
  swapped.
- :func:`changed`: the opt-in check for writes through ``.data`` (no version counter either):
  the swapped values compared bit for bit, at the exit, with a copy taken at the entry.
- :class:`Owner`: one owner of a model's parameters at a time. Swaps of one model nest last in,
  first out within one thread; another thread waits until the first has left them all; an
  out-of-order exit is refused, and the weights come back when the last swap leaves.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._names import first, keys
from ._zero import optimizers as zero_optimizers

# What a peft tuner layer or training wrapper's state is read from, on every swap.
_STATE = operator.attrgetter("merged_adapters", "_disable_adapters", "_active_adapter")


@functools.cache
def _is_layer(cls: type) -> bool:
    """Whether modules of ``cls`` are peft tuner layers or training wrappers (by what their
    class declares: no attribute lookup that fails through ``nn.Module.__getattr__``)."""
    return getattr(cls, "adapter_layer_names", None) is not None


def _peft_layers(model: nn.Module, name: str) -> tuple[list[nn.Module], str | None]:
    """The peft tuner layers and training wrappers on ``name``'s path (duck-typed, so any peft
    version and tuner type), and the adapter the parameter belongs to: the key that follows
    one of the innermost layer's adapter containers (``lora_A.<adapter>.weight``,
    ``lora_embedding_A.<adapter>``, ``modules_to_save.<adapter>.weight``, ...)."""
    parts = name.split(".")
    module: nn.Module | None = model
    layers, adapter = [], None
    for i, part in enumerate(parts[:-1]):
        if _is_layer(type(module)):
            layers.append(module)
            if part in module.adapter_layer_names:
                adapter = parts[i + 1]
        module = module._modules.get(part)
        if module is None:
            break
    return layers, adapter


class Readers:
    """For each bound parameter that belongs to a peft adapter, the layers that must read it."""

    def __init__(self, model: nn.Module, names: list[str]):
        pairs: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for name in names:
            layers, adapter = _peft_layers(model, name)
            if adapter is not None:
                for layer in layers:
                    pairs.setdefault((id(layer), adapter), (layer, adapter))
        self._pairs = list(pairs.values())
        self._layers = list({id(layer): layer for layer, _ in self._pairs}.values())
        self._model = model
        self._good: list | None = None  # the layers' states when last found good, copied

    def check(self, fn: str) -> None:
        """Raise a ValueError, before anything changes, if a swap could not change what the
        forward computes: the adapter layer is merged, disabled, or runs another adapter."""
        # Per step, the common case: every layer's state as when last found good, compared in
        # C (the attributes behind peft's properties, read directly).
        states = list(map(_STATE, self._layers))
        if states == self._good:
            return
        bad = [
            (layer, adapter)
            for layer, adapter in self._pairs
            if layer.merged_adapters
            or layer._disable_adapters
            or (
                layer._active_adapter != adapter
                and (isinstance(layer._active_adapter, str) or adapter not in layer._active_adapter)
            )
        ]
        if bad:
            raise ValueError(f"{fn}: {self._why(bad)} Nothing was changed.")
        # Copies: peft merges by appending to the same list, which must not compare equal.
        self._good = [(list(m), d, a if isinstance(a, str) else list(a)) for m, d, a in states]

    def _why(self, bad: list[tuple[nn.Module, str]]) -> str:
        paths = {id(m): n for n, m in self._model.named_modules()}
        merged = [paths.get(id(m), "?") for m, _ in bad if m.merged_adapters]
        disabled = [paths.get(id(m), "?") for m, _ in bad if m.disable_adapters]
        inactive = {
            a: sorted(set(m.active_adapters))
            for m, a in bad
            if not m.merged_adapters and not m.disable_adapters
        }
        lines = []
        if merged:
            lines.append(
                f"adapter layer(s) {keys(merged, 4)} are merged into the base weights, so the "
                "forward no longer reads the adapter's tensors: call model.unmerge_adapter() "
                "before the swap (and merge again after it, if you need to)."
            )
        if disabled:
            lines.append(
                f"adapter layer(s) {keys(disabled, 4)} are disabled (inside "
                "model.disable_adapter(), or disable_adapter_layers()), so the forward does not "
                "read the adapter's tensors: swap outside disable_adapter()."
            )
        for adapter, active in inactive.items():
            lines.append(
                f"the swap goes into adapter {adapter!r}, but the forward runs "
                f"{first([repr(a) for a in active]) or 'no adapter'}: call "
                f"model.set_adapter({adapter!r}), or take the snapshot of the active adapter."
            )
        return " ".join(lines)


def forget_casts() -> None:
    """Drop autocast's cached low-precision copies of the parameters: they are keyed on the
    parameter object, which a swap keeps, so they would outlive the swap."""
    torch.clear_autocast_cache()


def versions(params: list[torch.Tensor]) -> list[int]:
    """Each tensor's autograd version: every in-place write through autograd moves it."""
    return list(map(_version, params))


_version = operator.attrgetter("_version")


def written(names: list[str], params: list[torch.Tensor], before: list[int]) -> list[str]:
    """The names of the parameters written in place since their versions were ``before``."""
    now = versions(params)
    if now == before:  # one C comparison on the common path
        return []
    return [n for n, v, b in zip(names, now, before, strict=True) if v != b]


class Held:
    """The parameters swapped right now, each with the name and the holder it is swapped by;
    an optimizer step that would write into one is refused before it writes."""

    _now: dict[int, tuple[weakref.ref, str, Held]] = {}  # id(param) -> (param, name, held)
    _hooked = False

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        self._entries = {
            id(p): (weakref.ref(p), n, self) for n, p in zip(names, params, strict=True)
        }
        self._under: dict = {}
        self.holder: object = None
        # DeepSpeed's ZeRO optimizers step torch optimizers over their own fp32 master
        # partitions, which the step hook cannot tie to these parameters: their own step() is
        # refused instead, while the parameters are held, before it touches anything.
        self._zero = zero_optimizers(params)
        self._shadowed: list = []
        if not Held._hooked:  # installed once, for every optimizer of the process
            register_optimizer_step_pre_hook(_refuse_swapped_step)
            Held._hooked = True

    def hold(self, holder: object) -> None:
        """Register the parameters as swapped in by ``holder`` (until :meth:`release`)."""
        self.holder = holder
        now = Held._now
        # A nested swap of the same parameters: the outer one's entries come back at release.
        self._under = (
            {}
            if now.keys().isdisjoint(self._entries)
            else {k: now[k] for k in self._entries if k in now}
        )
        now.update(self._entries)
        for optimizer in self._zero:  # an instance attribute, gone at release
            self._shadowed.append((optimizer, optimizer.__dict__.get("step")))
            optimizer.step = functools.partial(_refuse_zero_step, self, optimizer)

    def release(self) -> None:
        now = Held._now
        for key in self._entries:
            now.pop(key, None)
        now.update(self._under)
        self._under = {}
        for optimizer, outer in reversed(self._shadowed):
            if outer is None:
                optimizer.__dict__.pop("step", None)
            else:  # a nested swap: the outer one's refusal comes back
                optimizer.step = outer
        self._shadowed = []

    @staticmethod
    def swapped(params) -> str | None:
        """Which of ``params`` are swapped in right now, and by whom (a sentence fragment), or
        None: the common case, one dict truth test."""
        now = Held._now
        if not now:
            return None
        hits = [now[id(p)] for p in params if id(p) in now and now[id(p)][0]() is p]
        if not hits:
            return None
        holders = {id(h.holder): h.holder for _, _, h in hits}.values()
        names = [n for _, n, _ in hits]
        return f"parameter(s) {keys(names, 4)} are swapped in by {', '.join(map(str, holders))}"

    @staticmethod
    def refuse_reads(fn: str, params) -> None:
        """Refuse to read the values of ``params`` while any is swapped in: they would be the
        reference's, not the policy's (a tracker's figures, a new snapshot or baseline)."""
        why = Held.swapped(params)
        if why is not None:
            raise RuntimeError(
                f"{fn}: {why}, so this would read the reference's values, not the policy's. "
                "Nothing was read or changed: call it outside `with snap:` (or after restore)."
            )


def _refuse_swapped_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not Held._now:  # the common case: nothing swapped anywhere
        return
    why = Held.swapped(p for group in optimizer.param_groups for p in group["params"])
    if why is not None:
        raise RuntimeError(f"{type(optimizer).__name__}.step(): {why}" + _STEP_REFUSED)


def _refuse_zero_step(held: Held, optimizer: object, *args, **kwargs) -> None:
    why = Held.swapped([ref() for ref, _, _ in held._entries.values()])
    raise RuntimeError(
        f"{type(optimizer).__name__}.step() (DeepSpeed's engine.step()): "
        f"{why or 'its parameters are swapped in'}" + _STEP_REFUSED
    )


_STEP_REFUSED = (
    ", so the step would write into the reference (pointer mode) or be thrown away at the "
    "exit (copy mode). Nothing was written, and the optimizer's state did not move. Step the "
    "optimizer after the swap leaves (outside `with snap:`, or after restore)."
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width, so that NaNs and -0.0 compare exactly."""
    if t.is_floating_point() and t.element_size() in _INTS:
        return t.view(_INTS[t.element_size()])
    return t


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed(names: list[str], values: list[torch.Tensor], copies: list[torch.Tensor]) -> list[str]:
    """The names whose ``values`` differ, bit for bit, from ``copies`` (on the CPU)."""
    return [
        n
        for n, v, c in zip(names, values, copies, strict=True)
        if not torch.equal(bits(v.cpu()), bits(c))
    ]


def write_error(written: list[str], unseen: list[str], spoiled: bool) -> RuntimeError:
    """The error for writes into the reference weights inside ``with snap:``: ``written`` in
    place (version counters), or ``unseen`` changes (``check_writes``)."""
    how = (
        "were written in place inside `with snap:` (an in-place op on the reference weights): "
        f"parameter(s) {keys(written)}"
        if written
        else "changed inside `with snap:` without autograd seeing it (a write through .data, "
        f"or a kernel that bypasses autograd; caught by check_writes=True): parameter(s) "
        f"{keys(unseen)}"
    )
    return RuntimeError(
        f"LoraReferenceSnapshot: the reference weights {how}. The live weights are back, bit "
        "for bit, and that write is gone. "
        + (
            "It went into the snapshot itself, which refuses every use until re-taken "
            "(snap.refresh(model)). "
            if spoiled
            else "The snapshot is intact. "
        )
        + "Write into the parameters outside `with snap:`."
    )


class Owner:
    """Who holds one model's parameters swapped: a thread, and its swaps, innermost last."""

    _all: weakref.WeakKeyDictionary[nn.Module, Owner] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def of(cls, model: nn.Module) -> Owner:
        with cls._lock:
            owner = cls._all.get(model)
            if owner is None:
                owner = cls._all[model] = cls()
            return owner

    def __init__(self):
        self._cond = threading.Condition()
        self._thread: int | None = None
        self._stack: list[list] = []  # [token, undo once it has left out of order]

    def enter(self, token: object) -> None:
        """Make this thread the owner (waiting while another thread is) and push ``token``."""
        me = threading.get_ident()
        with self._cond:
            while self._thread not in (None, me):
                self._cond.wait()
            self._thread = me
            self._stack.append([token, None])

    def leave(self, token: object, undo: Callable[[], None]) -> bool:
        """Pop ``token`` and run ``undo``, then the undos of the swaps beneath it that have
        already left out of order. ``token`` not innermost: keep ``undo`` for later and return
        False (the caller raises)."""
        with self._cond:
            if self._stack[-1][0] is not token:
                next(e for e in self._stack if e[0] is token)[1] = undo
                return False
            self._stack.pop()
            try:
                undo()
            finally:
                while self._stack and self._stack[-1][1] is not None:
                    self._stack.pop()[1]()
                if not self._stack:
                    self._thread = None
                    self._cond.notify_all()
            return True

    def check_free(self, fn: str) -> None:
        """Refuse a pure swap_in / restore while another thread holds the model swapped."""
        with self._cond:
            if self._thread not in (None, threading.get_ident()):
                raise RuntimeError(
                    f"{fn}: another thread has this model's parameters swapped (a "
                    "LoraReferenceSnapshot is entered there); its forward would see your values "
                    "and yours its. Nothing was changed: wait until it leaves."
                )
