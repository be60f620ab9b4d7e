"""The adapter file format, read and written in one place: what a peft adapter directory
holds (weights file, config, a non-default adapter's subfolder), how its file keys map to live
parameter names (peft's own map), which config fields the forward depends on, and the plain
file :meth:`LoraReferenceSnapshot.save_pretrained` writes for a model that is not a peft model.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import torch
from torch import nn

PEFT_FILE = "adapter_model.safetensors"
"""The weights file of a peft adapter directory (``save_pretrained``'s default)."""
CONFIG_FILE = "adapter_config.json"
PLAIN_FILE = "reference.safetensors"
"""What :meth:`LoraReferenceSnapshot.save_pretrained` writes for a model that is not a peft
model: the tensors keyed by live parameter name."""


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when nothing has)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# Config fields that cannot change what the adapter's tensors compute, given the tensors: names
# and bookkeeping, dropout (off in eval, random in training either way), and which modules are
# targeted (a different set shows as skipped or missing keys, checked separately). Every other
# field of any peft tuner type is compared: a field peft adds later is compared until it is
# known not to matter, which errs on the side of an error over a wrong reference.
_IGNORED_FIELDS = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "target_modules",
        "target_parameters",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "lora_dropout",
        "dropout",
        "module_dropout",
        "rank_dropout",
        "init_weights",
        "save_projection",
        "runtime_config",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
    }
)
# init_lora_weights values that only draw the tensors' starting values; the others (PiSSA, OLoRA,
# CorDA, LoftQ, ...) also rewrite the base weights, which the adapter's tensors rely on.
_RANDOM_INITS = (True, False, "gaussian", "orthogonal", "eva")


def weights_path(
    adapter_dir: str | os.PathLike, adapter_name: str, filename: str, fn: str = "load_adapter_dict"
) -> str:
    directory = os.fspath(adapter_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{fn}: adapter_dir {directory!r} is not a directory")
    candidates = [os.path.join(directory, filename)]
    if adapter_name != "default":
        # peft's save_pretrained puts a non-default adapter in a subfolder of its name.
        candidates.append(os.path.join(directory, adapter_name, filename))
    for path in candidates:
        if os.path.isfile(path):
            return path
    hint = ""
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        hint = " Found adapter_model.bin: re-save it with save_pretrained(safe_serialization=True)."
    raise FileNotFoundError(
        f"{fn}: no weights file {filename!r} in {directory!r} "
        f"(looked for {', '.join(map(repr, candidates))}).{hint}"
    )


def saved_config(path: str, fn: str) -> dict | None:
    """The ``adapter_config.json`` beside the weights file ``path``; None when there is none."""
    config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: cannot read {config_path!r}: {e}") from None


def check_config(path: str, live_config, adapter_name: str) -> None:
    """Refuse a saved ``adapter_config.json`` that differs from ``live_config`` in anything the
    forward computes."""
    saved = saved_config(path, "load_adapter_dict")
    if saved is None:
        return
    live = plain(live_config.to_dict())
    config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
    differ = [
        f"{field}: file {saved[field]!r}, live {live[field]!r}"
        for field in sorted(saved.keys() & live.keys() - _IGNORED_FIELDS)
        if _forward(field, plain(saved[field])) != _forward(field, live[field])
    ]
    if differ:
        raise ValueError(
            f"load_adapter_dict: {config_path!r} differs from the live adapter {adapter_name!r} "
            f"in what the forward computes ({'; '.join(differ)}). Its tensors would not "
            "reproduce the saved adapter: build the live adapter with the saved config."
        )


def _forward(field: str, value):
    """What of a config value the forward depends on."""
    if field == "init_lora_weights" and value in _RANDOM_INITS:
        return "random"
    return value


def plain(value):
    """JSON's view of a config value: enums as their values, tuples and sets as lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return getattr(value, "value", value)


def file_keys(
    model: nn.Module, adapter_name: str, live: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File key -> the live tensor (parameter or buffer) it is saved from, as peft's own save
    path maps them; ``live`` is ``model.state_dict(keep_vars=True)``, walked once by the
    caller."""
    from peft import get_peft_model_state_dict

    # Handing peft the tensors themselves (keep_vars) makes its key transform reveal which live
    # tensor each file key comes from: no string rules of our own.
    return get_peft_model_state_dict(
        model, state_dict=live, adapter_name=adapter_name, save_embedding_layers=False
    )


@contextmanager
def reading(fn: str, path: str):
    """Turn whatever safetensors raises for a bad file into one ValueError naming the path."""
    try:
        yield
    except Exception as e:
        raise ValueError(
            f"{fn}: cannot read {path!r} as safetensors ({type(e).__name__}: {e}). "
            "Is the file truncated, or not written by save_pretrained?"
        ) from None
