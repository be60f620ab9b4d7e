"""Writing a reference back: a peft adapter directory (or, for other models, one file keyed
by parameter name, which the loader reads back), written atomically."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from . import _sharding as sharding
from ._adapter import LoadReport, file_keys, reading
from ._buffers import host_copy
from ._checks import keys

PLAIN_FILE = "reference.safetensors"
"""What :meth:`LoraReferenceSnapshot.save_pretrained` writes for a model that is not a peft
model: the tensors keyed by live parameter name."""


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when nothing has)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def read_plain(model: nn.Module, path: str, strict: bool, pin: bool | None):
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
        state = {}
        for n in wanted:
            index = sharding.shard_index(params[n])
            value = f.get_tensor(n) if index is None else f.get_slice(n)[index]
            state[n] = host_copy(value, like=sharding.local(params[n]), pin=pin)
    return state, LoadReport(path, tuple(wanted), skipped, missing), params


def adapter_files(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """What a saved adapter holds for ``state``: ``(tensors, config)``. For a peft model, the
    tensors under peft's own file keys (the map :func:`load_adapter_dict` reads, reversed)
    and the live adapter's config; otherwise the tensors by live name and no config."""
    tensors = {n: v.detach().contiguous().clone() for n, v in state.items()}
    if not is_peft(model):
        return tensors, None
    name_of = {id(p): n for n, p in model.named_parameters()}
    live = model.state_dict(keep_vars=True)
    for adapter, config in model.peft_config.items():
        file_key = {
            name_of[id(v)]: k
            for k, v in file_keys(model, adapter, live).items()
            if id(v) in name_of
        }
        if all(n in file_key for n in state):
            return {file_key[n]: v for n, v in tensors.items()}, config
    raise ValueError(
        "save_pretrained: the snapshot's tensors do not all belong to one adapter of the model "
        f"({keys(model.peft_config)}); a peft adapter directory holds one adapter."
    )


def write_atomically(directory: str | os.PathLike, tensors: dict, config) -> str:
    """Write ``tensors`` (and ``config``'s ``adapter_config.json``) into ``directory`` through a
    temporary directory renamed into place: a crash leaves the old directory or none, never a
    half-written adapter that looks whole."""
    from safetensors.torch import save_file

    target = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        name = PLAIN_FILE if config is None else "adapter_model.safetensors"
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        if config is not None:
            config.save_pretrained(tmp)
        if os.path.exists(target):
            old = tmp + ".old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
