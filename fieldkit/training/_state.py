"""State dicts in and out of a model: capture the trainable weights, soft-update a reference."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ._buffers import copy_all, host_empty, packed
from ._checks import StateDict, check_alpha, check_shapes, keys, trainable


def capture_trainable(model: nn.Module, /) -> StateDict:
    """Copy every trainable parameter of ``model`` to the CPU.

    Args:
        model: any module; the parameters with ``requires_grad=True`` are copied.

    Returns:
        A new dict ``{name: tensor}`` keyed by ``named_parameters()`` names. The tensors are
        CPU copies in the parameter's layout (strides, for a dense parameter; pinned when the
        parameter is on CUDA), detached, never sharing storage with the model. Empty when
        nothing is trainable.

    Raises:
        ValueError: a trainable parameter fieldkit cannot read (offloaded to ``meta``, FSDP1,
            offloaded ZeRO-3, quantized); the message names them. For a sharded (FSDP2,
            ZeRO-3) parameter the copy is this rank's piece.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> state = capture_trainable(layer)
    >>> sorted(state), state["weight"].device.type
    (['bias', 'weight'], 'cpu')
    >>> state["weight"].data_ptr() != layer.weight.data_ptr()
    True
    """
    found = trainable("capture_trainable", model)
    state = {name: host_empty(v) for name, v in found}
    copy_all(list(state.values()), [v for _, v in found])  # one wait, not one per tensor
    return state


def soft_update_(
    reference: Mapping[str, torch.Tensor], policy: Mapping[str, torch.Tensor], alpha: float, /
) -> None:
    """``reference ← (1 − alpha)·reference + alpha·policy``, in place, tensor by tensor.

    The soft reference update of TR-DPO and of an EMA reference. Computed in float32 (float64
    when either side is float64) and rounded once to ``reference``'s dtype; ``alpha=0`` leaves
    ``reference`` untouched and ``alpha=1`` copies ``policy`` exactly.

    Args:
        reference: the state dict to update, e.g. :attr:`LoraReferenceSnapshot.state`.
        policy: a state dict or ``dict(model.named_parameters())`` holding every name of
            ``reference``, with the same shapes.
        alpha: the weight of ``policy``, in [0, 1].

    Raises:
        ValueError: ``alpha`` outside [0, 1] (or NaN), names of ``reference`` missing from
            ``policy``, or a shape mismatch; checked before anything is written.
        TypeError: ``alpha`` is not a number.

    >>> import torch
    >>> ref = {"w": torch.zeros(2)}
    >>> soft_update_(ref, {"w": torch.tensor([1.0, -2.0])}, 0.25)
    >>> ref["w"]
    tensor([ 0.2500, -0.5000])
    """
    alpha = check_alpha("soft_update_", alpha)
    missing = [k for k in reference if k not in policy]
    if missing:
        raise ValueError(f"soft_update_: policy has no value for {keys(missing)}")
    check_shapes(
        "soft_update_", [(k, r, policy[k]) for k, r in reference.items()], ("reference", "policy")
    )
    if alpha == 0.0:
        return
    refs, news = list(reference.values()), [policy[name] for name in reference]
    with torch.no_grad():
        if alpha < 1.0:  # the policy on the reference's devices first, one wait for all
            if all(ref.is_cpu for ref in refs):  # one (pinned, for CUDA) block per group
                held = packed(news, on_host=True)[0]
            else:
                held = [
                    torch.empty_like(new, device=ref.device)
                    for ref, new in zip(refs, news, strict=True)
                ]
            copy_all(held, news)
            news = [_lerp(ref, new, alpha) for ref, new in zip(refs, held, strict=True)]
        copy_all(refs, news)


def _lerp(ref: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − alpha)·ref + alpha·new`` in float32 (float64 when either side is float64)."""
    dtype = torch.float64 if torch.float64 in (ref.dtype, new.dtype) else torch.float32
    return ref.to(dtype).lerp(new.to(dtype), alpha)
