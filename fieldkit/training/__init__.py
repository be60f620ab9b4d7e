"""Fine-tuning primitives: a CPU-held LoRA reference policy and a weight-delta check.

Pure functions over plain state dicts (``dict[str, Tensor]``):
:func:`capture_trainable`, :func:`load_adapter_dict`, :func:`swap_in`, :func:`restore`,
:func:`weight_delta`, :func:`delta_report`, :func:`soft_update_`; and two thin classes over
them: :class:`LoraReferenceSnapshot`, :class:`WeightDeltaTracker`. Transformers ``Trainer``
callbacks live in :mod:`fieldkit.training.hf`; ``python -m fieldkit.training`` diffs and
inspects saved adapters.

Importing this package costs nothing: torch is imported when a name is first used, and a
missing torch is one clear ``ImportError``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # explicit re-exports for editors and type checkers
    from ._adapter import LoadReport as LoadReport
    from ._adapter import load_adapter_dict as load_adapter_dict
    from ._checks import StateDict as StateDict
    from ._delta import weight_delta as weight_delta
    from ._delta import weight_delta_path as weight_delta_path
    from ._report import DeltaReport as DeltaReport
    from ._report import TensorDelta as TensorDelta
    from ._report import delta_report as delta_report
    from ._snapshot import LoraReferenceSnapshot as LoraReferenceSnapshot
    from ._state import capture_trainable as capture_trainable
    from ._state import soft_update_ as soft_update_
    from ._swap import restore as restore
    from ._swap import swap_in as swap_in
    from ._tracker import WeightDeltaTracker as WeightDeltaTracker

_EXPORTS = {
    "StateDict": "_checks",
    "capture_trainable": "_state",
    "swap_in": "_swap",
    "restore": "_swap",
    "weight_delta": "_delta",
    "weight_delta_path": "_delta",
    "soft_update_": "_state",
    "delta_report": "_report",
    "DeltaReport": "_report",
    "TensorDelta": "_report",
    "LoadReport": "_adapter",
    "load_adapter_dict": "_adapter",
    "LoraReferenceSnapshot": "_snapshot",
    "WeightDeltaTracker": "_tracker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    except ModuleNotFoundError as e:
        if e.name != "torch" and not (e.name or "").startswith("torch."):
            raise
        raise missing(f"fieldkit.training.{name}", "torch") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


DISTRIBUTION = "fieldkit-training"
"""This project's name on the package registry (its ``fieldkit`` is another project)."""

_TORCH_FIRST = (
    "Install the torch build for your machine first (CPU only: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu; CUDA: the command pytorch.org gives "
    f"for your CUDA), then pip install '{DISTRIBUTION}[peft]'"
)
_EXTRA = {"peft": "peft", "transformers": "peft", "trl": "trl", "datasets": "trl"}


def missing(what: str, module: str) -> ImportError:
    """The one ImportError for a missing dependency: what needs it, and how to install it
    without pulling a multi-GB CUDA torch by surprise."""
    top = module.split(".")[0]
    if top == "torch":
        name, how = "PyTorch", _TORCH_FIRST
    elif top in _EXTRA:
        name, how = top, f"pip install '{DISTRIBUTION}[{_EXTRA[top]}]' (with torch installed)"
    else:
        name, how = top, f"pip install {top}"
    return ImportError(f"{what} needs {name}, which is not installed: {how}.")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
