"""Read a peft adapter directory into a state dict keyed by the live model's parameter names."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import _sharding as sharding
from . import missing
from ._buffers import host_empty
from ._checks import StateDict, check_usable, first, keys
from ._format import PLAIN_FILE, check_config, file_keys, is_peft, plain, reading, weights_path
from ._guards import bits


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_adapter_dict` matched, each field sorted.

    Attributes:
        path: the safetensors file that was read.
        loaded: live parameter names that got a value from the file.
        skipped: file keys with no trainable live parameter (frozen base weights peft saved,
            e.g. ``embed_tokens.base_layer.weight``; other adapters; typos).
        missing: trainable live parameter names the file has no value for.

    >>> print(LoadReport("sft/adapter.safetensors", loaded=("a", "b"),
    ...                  skipped=("embed.base_layer.weight",), missing=()))
    2 loaded from sft/adapter.safetensors; 1 file key(s) skipped: 'embed.base_layer.weight'
    """

    path: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    missing: tuple[str, ...]

    def __str__(self) -> str:
        text = f"{len(self.loaded)} loaded from {self.path}"
        if self.skipped:
            text += f"; {len(self.skipped)} file key(s) skipped: {keys(self.skipped, 4)}"
        if self.missing:
            text += f"; {len(self.missing)} trainable parameter(s) missing: {keys(self.missing, 4)}"
        return text


def _require(module: str, fn: str):
    try:
        return __import__(module)
    except ImportError:
        raise missing(fn, module) from None


def load_adapter_dict(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    /,
    *,
    adapter_name: str = "default",
    weights_filename: str = "adapter_model.safetensors",
    strict: bool = False,
) -> tuple[StateDict, LoadReport]:
    """Read a peft adapter directory into a CPU state dict keyed by live parameter names.

    File keys are mapped to ``model``'s parameters by peft's own key transform
    (``get_peft_model_state_dict``), so every peft key form maps right: LoRA on Linear and
    Embedding, DoRA magnitudes, ``modules_to_save``, trainable tokens, biases. Only file keys
    whose live parameter is trainable are read; values are cast to the live dtype. If the
    directory's ``adapter_config.json`` disagrees with the live adapter on anything the forward
    computes (``r``, ``lora_alpha``, ``use_dora``, ...), that is an error.

    Args:
        model: the live ``peft.PeftModel``.
        adapter_dir: a directory written by peft's ``save_pretrained``. For a non-default
            ``adapter_name`` the file may sit in its subfolder ``<adapter_dir>/<adapter_name>/``.
        adapter_name: the live adapter whose parameters receive the values.
        weights_filename: the safetensors file inside the directory.
        strict: make any skipped file key or missing trainable parameter an error.

    Returns:
        ``(state, report)``: the state dict for :func:`swap_in`, and a :class:`LoadReport`.

    Raises:
        FileNotFoundError: no such directory or weights file.
        ValueError: the file is not valid safetensors (the message names the path), a shape
            mismatch (naming the key and both shapes), a config mismatch, an unknown
            ``adapter_name``, nothing matched, or with ``strict=True`` anything skipped or
            missing.
        TypeError: ``model`` is not a ``peft.PeftModel``.
        ImportError: safetensors or peft is not installed.

    >>> import tempfile, torch, transformers, peft
    >>> def tiny():
    ...     torch.manual_seed(0)
    ...     cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
    ...         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    ...     lora = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ...     return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)
    >>> saved_dir = tempfile.mkdtemp()
    >>> tiny().save_pretrained(saved_dir)
    >>> state, report = load_adapter_dict(tiny(), saved_dir)
    >>> len(report.loaded), report.skipped, report.missing
    (2, (), ())
    >>> next(iter(state))
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'
    """
    options = dict(adapter_name=adapter_name, weights_filename=weights_filename, strict=strict)
    state, report, _ = read_adapter(model, adapter_dir, **options)
    return state, report


def read_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    /,
    *,
    adapter_name: str,
    weights_filename: str,
    strict: bool,
    into: Into | None = None,
) -> tuple[StateDict, LoadReport, dict[str, nn.Parameter]]:
    """:func:`load_adapter_dict`, and the model's parameters by name as it walked them, so
    that a caller binding the state walks the model no second time. ``into``: where the values
    go, given the live tensors in name order (default: one CPU tensor each, pinned for CUDA);
    each is read straight into its destination, one file tensor at a time."""
    fn = "load_adapter_dict"
    _require("safetensors", fn)
    plain_file = os.path.join(os.fspath(adapter_dir), PLAIN_FILE)
    if not is_peft(model) and os.path.isfile(plain_file):
        return read_plain(model, plain_file, strict, into)
    peft = _require("peft", fn)
    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{fn}: model must be a peft.PeftModel (from get_peft_model or "
            f"PeftModel.from_pretrained), got {type(model).__name__} (another model reads a "
            f"directory with a {PLAIN_FILE!r} written by LoraReferenceSnapshot.save_pretrained)"
        )
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"{fn}: the model has no adapter {adapter_name!r}; its adapters: "
            f"{keys(model.peft_config)}"
        )
    config = model.peft_config[adapter_name]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"{fn}: adapter {adapter_name!r} is a {plain(config.peft_type)} adapter (prompt "
            "learning): its file holds virtual-token embeddings that peft feeds in front of the "
            "input, not weights of the model's layers, so there is nothing to swap. fieldkit "
            "swaps the weights of layer adapters (LoRA, DoRA, LoHa, IA3, ...)."
        )
    active = list(model.active_adapters)
    if adapter_name not in active:  # checked here too: an adapter's biases have no adapter name
        raise ValueError(
            f"{fn}: the swap goes into adapter {adapter_name!r}, but the forward runs "
            f"{first([repr(a) for a in active]) or 'no adapter'}: call "
            f"model.set_adapter({adapter_name!r}) first, or read the adapter the forward runs. "
            "Nothing was read."
        )
    path = weights_path(adapter_dir, adapter_name, weights_filename)
    check_config(path, config, adapter_name)

    params = sharding.named_parameters(model)
    live_tensors = model.state_dict(keep_vars=True)
    by_file_key = file_keys(model, adapter_name, live_tensors)
    name_of = {id(p): n for n, p in params.items()}
    live_name = {k: name_of[id(v)] for k, v in by_file_key.items() if id(v) in name_of}
    from safetensors import safe_open

    with reading(fn, path):
        with safe_open(path, framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    wanted = {
        k: live_name[k] for k in shapes if k in live_name and params[live_name[k]].requires_grad
    }
    check_usable(fn, [(n, params[n]) for n in wanted.values()])  # before shapes: ZeRO-3's are 0
    mismatched = [
        f"{k!r} (live {n!r}): file {shapes[k]}, live {tuple(sharding.full_shape(params[n]))}"
        for k, n in wanted.items()
        if shapes[k] != tuple(sharding.full_shape(params[n]))
    ]
    if mismatched:
        raise ValueError(
            f"{fn}: shape mismatch between {path!r} and the live adapter {adapter_name!r}: "
            + first(mismatched, sep="; ")
        )
    skipped = tuple(k for k in shapes if k not in wanted)
    loaded = set(wanted.values())
    missing = tuple(sorted(n for n, p in params.items() if p.requires_grad and n not in loaded))
    if not wanted:
        frozen = [k for k in skipped if k in live_name]
        hint = (
            " The matching live parameters are frozen (requires_grad=False): load the live "
            "adapter with is_trainable=True."
            if frozen
            else " Is this an adapter of this model, and the right adapter_name?"
        )
        raise ValueError(
            f"{fn}: nothing in {path!r} matches a trainable parameter of the model. "
            f"File keys: {keys(skipped, 4) or 'none'}.{hint}"
        )
    if strict and (skipped or missing):
        raise ValueError(
            f"{fn}(strict=True): {path!r} does not match the live adapter exactly. "
            f"Skipped file key(s): {keys(skipped) or 'none'}. "
            f"Missing trainable parameter(s): {keys(missing) or 'none'}."
        )
    by_name: dict[str, list[str]] = {}  # peft maps some parameters from two file keys
    for k, n in wanted.items():
        by_name.setdefault(n, []).append(k)
    with reading(fn, path):
        with safe_open(path, framework="pt", device="cpu") as f:
            _check_aliases(path, [ks for ks in by_name.values() if len(ks) > 1], f.get_tensor)
            unread = _unread(live_tensors, skipped, by_file_key, live_name, name_of, f.get_tensor)
            state = _read_into(f, [(ks[0], n) for n, ks in by_name.items()], params, into)
    ours = set(live_name.values())
    unread += [f"{n!r} (live, trainable: not in the file)" for n in missing if n in ours]
    if unread:
        warnings.warn(
            f"{fn}: the reference will differ from {path!r}: {first(unread, 6, '; ')}. "
            "Tolerated because strict=False; pass strict=True to make this an error.",
            UserWarning,
            stacklevel=3,
        )
    return state, LoadReport(path, tuple(state), skipped, missing), params


def _check_aliases(path: str, groups: list[list[str]], read) -> None:
    """Refuse a file whose keys for one live parameter (``bias="all"`` with a
    ``modules_to_save`` layer: ``x.bias`` and ``x.modules_to_save.bias``) hold different
    values: which one the reference should be is not the file's to say."""
    differ = [ks for ks in groups if not all(_same_bits(read(ks[0]), read(k)) for k in ks[1:])]
    if differ:
        raise ValueError(
            f"load_adapter_dict: {path!r} holds different values under file keys that peft maps "
            f"to one live parameter: {first([keys(ks) for ks in differ], 4, '; ')}. Re-save "
            "the adapter with peft's save_pretrained."
        )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def _unread(live_tensors, skipped, by_file_key, live_name, name_of, read) -> list[str]:
    """Check what the file holds beyond the trainable tensors against the model: a buffer the
    forward reads (VeRA's projections, ...) that differs is an error; a frozen weight that
    differs, a tensor of this adapter left frozen, or a key the model has nothing for, is
    returned, described, for the caller's warning."""
    unread, buffers = [], []
    for k in skipped:
        live = by_file_key.get(k)
        if k in live_name:
            unread.append(f"{k!r} (its live parameter is frozen)")
        elif live is not None and id(live) not in name_of:
            if not _same(read(k), live):
                buffers.append(k)
        elif k in live_tensors:
            if not _same(read(k), live_tensors[k]):
                unread.append(f"{k!r} (differs from the live, frozen weight)")
        else:
            unread.append(f"{k!r} (no such tensor in the live model)")
    if buffers:
        raise ValueError(
            f"load_adapter_dict: buffer(s) {keys(buffers)} in the file differ from the live "
            "model's, and the forward reads them (e.g. VeRA's shared projections, made from "
            "projection_prng_key): build the live adapter the way the saved one was built."
        )
    return unread


def _same(saved: torch.Tensor, live: torch.Tensor) -> bool:
    saved = sharding.cut(live, lambda index: saved if index is None else saved[index])
    live = sharding.local(live)
    return saved.shape == live.shape and torch.equal(saved.to(live.dtype), live.detach().cpu())


def read_plain(model: nn.Module, path: str, strict: bool, into: Into | None):
    """A :data:`PLAIN_FILE` read back, checked as a peft file is."""
    from safetensors import safe_open

    fn = "load_adapter_dict"
    params = sharding.named_parameters(model)
    with reading(fn, path), safe_open(path, framework="pt", device="cpu") as f:
        names = sorted(f.keys())
        wanted = [n for n in names if n in params and params[n].requires_grad]
        skipped = tuple(n for n in names if n not in wanted)
        missing = tuple(sorted(n for n, p in params.items() if p.requires_grad and n not in wanted))
        if not wanted or (strict and (skipped or missing)):
            raise ValueError(
                f"{fn}{'(strict=True)' if strict else ''}: {path!r} does not match the model's "
                f"trainable parameters. Skipped file key(s): {keys(skipped) or 'none'}. "
                f"Missing trainable parameter(s): {keys(missing) or 'none'}."
            )
        check_usable(fn, [(n, params[n]) for n in wanted])
        state = _read_into(f, [(n, n) for n in wanted], params, into)
    return state, LoadReport(path, tuple(wanted), skipped, missing), params


Into = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Given the live tensors a load fills, in name order: the CPU tensors to read them into."""


def _read_into(f, pairs: list[tuple[str, str]], params: dict, into: Into | None) -> StateDict:
    """``{name: value}`` for each ``(file key, live name)`` of the open safetensors file ``f``,
    in name order, each read into its destination from ``into``; a sharded (FSDP2) parameter
    reads only this rank's shard, a ZeRO-3 parameter its partition."""
    pairs = sorted(pairs, key=lambda pair: pair[1])
    likes = [sharding.local(params[n]) for _, n in pairs]
    dsts = into(likes) if into is not None else [host_empty(like) for like in likes]
    for (k, n), dst in zip(pairs, dsts, strict=True):
        read = lambda index, k=k: f.get_tensor(k) if index is None else f.get_slice(k)[index]  # noqa: E731
        dst.copy_(sharding.cut(params[n], read))
    return {n: dst for (_, n), dst in zip(pairs, dsts, strict=True)}
