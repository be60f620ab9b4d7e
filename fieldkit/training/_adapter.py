"""Read a peft adapter directory into a state dict keyed by the live model's parameter names."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from . import _sharding as sharding
from ._buffers import host_copy
from ._checks import StateDict, first, keys

# Config fields that change what the adapter's tensors compute: if the file and the live
# adapter disagree on one, swapping the tensors cannot reproduce the saved adapter.
_FORWARD_FIELDS = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "trainable_token_indices",
)


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
        raise ImportError(
            f"{fn} needs {module}, which is not installed: pip install {module} "
            "(or pip install 'fieldkit[peft]')"
        ) from None


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
    config_path = os.path.join(os.path.dirname(path), "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: cannot read {config_path!r}: {e}") from None


def _check_config(path: str, live_config, adapter_name: str) -> None:
    saved = saved_config(path, "load_adapter_dict")
    if saved is None:
        return
    config_path = os.path.join(os.path.dirname(path), "adapter_config.json")
    differ = [
        f"{field}: file {saved[field]!r}, live {getattr(live_config, field)!r}"
        for field in _FORWARD_FIELDS
        if field in saved
        and hasattr(live_config, field)
        and _plain(saved[field]) != _plain(getattr(live_config, field))
    ]
    if differ:
        raise ValueError(
            f"load_adapter_dict: {config_path!r} differs from the live adapter {adapter_name!r} "
            f"in what the forward computes ({'; '.join(differ)}). Its tensors would not "
            "reproduce the saved adapter: build the live adapter with the saved config."
        )


def _plain(value):
    """JSON's view of a config value: enums as their values, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def _file_key_map(
    model: nn.Module, adapter_name: str, params: dict[str, nn.Parameter]
) -> dict[str, str]:
    """File key -> live parameter name, as peft's own save path maps them."""
    from peft import get_peft_model_state_dict

    # Handing peft the Parameter objects themselves (keep_vars) makes its key transform reveal
    # which live parameter each file key comes from: no string rules of our own.
    by_file_key = get_peft_model_state_dict(
        model,
        state_dict=model.state_dict(keep_vars=True),
        adapter_name=adapter_name,
        save_embedding_layers=False,
    )
    name_of = {id(p): n for n, p in params.items()}
    return {k: name_of[id(v)] for k, v in by_file_key.items() if id(v) in name_of}


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
) -> tuple[StateDict, LoadReport, dict[str, nn.Parameter]]:
    """:func:`load_adapter_dict`, and the model's parameters by name as it walked them, so
    that a caller binding the state walks the model no second time."""
    fn = "load_adapter_dict"
    _require("safetensors", fn)
    peft = _require("peft", fn)
    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{fn}: model must be a peft.PeftModel (from get_peft_model or "
            f"PeftModel.from_pretrained), got {type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"{fn}: the model has no adapter {adapter_name!r}; its adapters: "
            f"{keys(model.peft_config)}"
        )
    path = weights_path(adapter_dir, adapter_name, weights_filename)
    _check_config(path, model.peft_config[adapter_name], adapter_name)

    params = sharding.named_parameters(model)
    live_name = _file_key_map(model, adapter_name, params)
    from safetensors import safe_open

    with reading(fn, path):
        with safe_open(path, framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    wanted = {
        k: live_name[k] for k in shapes if k in live_name and params[live_name[k]].requires_grad
    }
    mismatched = [
        f"{k!r} (live {n!r}): file {shapes[k]}, live {tuple(params[n].shape)}"
        for k, n in wanted.items()
        if shapes[k] != tuple(params[n].shape)
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
    state = {}
    with reading(fn, path):
        with safe_open(path, framework="pt", device="cpu") as f:
            for k, n in wanted.items():
                like = sharding.local(params[n])
                index = sharding.shard_index(params[n])
                # A sharded (FSDP2) parameter reads only this rank's shard from the file.
                value = f.get_tensor(k) if index is None else f.get_slice(k)[index]
                state[n] = host_copy(value, like=like)
    report = LoadReport(path, tuple(sorted(state)), skipped, missing)
    return dict(sorted(state.items())), report, params


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
