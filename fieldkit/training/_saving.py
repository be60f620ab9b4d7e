"""Writing a reference back: a peft adapter directory (or, for other models, one file keyed
by parameter name, which the loader reads back), written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from . import _sharding as sharding
from ._checks import keys
from ._format import PEFT_FILE, PLAIN_FILE, file_keys, is_peft


def save(
    model: nn.Module,
    names: list[str],
    params: list[torch.Tensor],
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
) -> str:
    """Write ``state`` (values of ``params`` of ``model``, by ``names``) as one whole adapter
    (:func:`adapter_keys`, :func:`write_atomically`); returns the directory's absolute path.
    Sharded (FSDP2, ZeRO-3) values are this rank's pieces: every rank gathers the whole tensors
    (a collective), rank 0 writes, and every rank learns whether it could: an error there is
    an error on every rank, never a hang."""
    key_of, config = adapter_keys(model, list(state))  # the same answer on every rank
    if not any(map(sharding.is_sharded, params)):
        tensors = {key_of[n]: v.detach().contiguous().clone() for n, v in state.items()}
        return write_atomically(directory, tensors, config)
    sharding.agree("save_pretrained")
    by_name = dict(zip(names, params, strict=True))
    whole = {key_of[n]: sharding.gather(by_name[n], v) for n, v in state.items()}
    path = os.path.abspath(os.fspath(directory))
    failure: Exception | None = None
    if torch.distributed.get_rank() == 0:
        try:
            write_atomically(path, whole, config)
        except Exception as e:  # told to every rank below, then raised here
            failure = e
    failed = torch.tensor([failure is not None], dtype=torch.int32)
    failed = failed.to(sharding.reduce_device((None,), failed.device))
    torch.distributed.all_reduce(failed, torch.distributed.ReduceOp.MAX)  # also the barrier
    if failure is not None:
        raise failure
    if failed.item():
        raise RuntimeError(
            f"save_pretrained: rank 0 could not write {path!r} (its error says why); nothing "
            "was written."
        )
    return path


def adapter_keys(model: nn.Module, names: list[str]) -> tuple[dict[str, str], object | None]:
    """How a saved adapter keys the parameters ``names``, and its config: for a peft model,
    peft's own file keys (the map :func:`load_adapter_dict` reads, reversed) and the live
    adapter's config; otherwise the live names and no config."""
    if not is_peft(model):
        return {n: n for n in names}, None
    live = model.state_dict(keep_vars=True)  # FSDP2 reshards under this: walk the names after
    name_of = {id(p): n for n, p in sharding.named_parameters(model).items()}
    for adapter, config in model.peft_config.items():
        file_key = {
            name_of[id(v)]: k
            for k, v in file_keys(model, adapter, live).items()
            if id(v) in name_of
        }
        if all(n in file_key for n in names):
            return {n: file_key[n] for n in names}, config
    raise ValueError(
        "save_pretrained: the snapshot's tensors do not all belong to one adapter of the model "
        f"({keys(model.peft_config)}); a peft adapter directory holds one adapter."
    )


def write_atomically(directory: str | os.PathLike, tensors: dict, config) -> str:
    """Write ``tensors`` (and ``config``'s ``adapter_config.json``) into ``directory`` through a
    temporary directory renamed into place: a crash leaves the old directory or none, never a
    half-written adapter that looks whole. Writers into one directory take turns (every rank
    of a replicated run may save the same reference)."""
    from safetensors.torch import save_file

    target = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        name = PLAIN_FILE if config is None else PEFT_FILE
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        if config is not None:
            config.save_pretrained(tmp)
        with _turn(parent):  # one writer at a time swaps it in
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


@contextlib.contextmanager
def _turn(parent: str):
    """Hold an exclusive lock on the directory ``parent`` (POSIX ``flock``, which leaves no
    file behind; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
