"""What sharded training changes: which tensor to read and write, FSDP2's unsharded copies,
global sums, and what is refused.

- FSDP2 (``fully_shard``): parameters are DTensors; each rank holds a shard. fieldkit reads and
  writes the local shard (``p.to_local()``) in place: FSDP2 all-gathers from that storage, so
  a re-pointed ``.data`` would never be seen. Around a swap every FSDP2 module is resharded,
  so that no unsharded copy of the other weights outlives it (FSDP2 re-gathers on the next
  forward or backward).
- Global figures: a sum of squares is summed over the mesh dimensions a parameter is sharded
  on; a max is taken over them. Replicated dimensions (DDP, HSDP's replica groups) already
  hold the same values.
- DeepSpeed ZeRO-3: each rank holds a flat partition (``_zero``), read and written in place.
- Refused, by name: ZeRO-3 offloaded or hierarchical partitions, FSDP1 ``FlatParameter``s, DTensors
  with a ``Partial`` placement, and DTensors on a torch without the public ``DTensor`` and
  ``FSDPModule`` (before 2.6): single-process use works on any torch the extras allow.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from torch import nn

from . import _zero as zero

try:  # FSDP2 and DTensor as fieldkit uses them: public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # an older torch, or one built without torch.distributed
    DTensor = Replicate = Shard = FSDPModule = FullyShardedDataParallel = ()  # isinstance: False


def is_sharded(param: torch.Tensor) -> bool:
    """Whether each rank holds only a piece of ``param``: FSDP2 (DTensor) or DeepSpeed ZeRO-3."""
    return isinstance(param, DTensor) or zero.is_zero3(param)


def local(param: torch.Tensor) -> torch.Tensor:
    """The tensor fieldkit reads and writes for ``param`` (any tensor): its ``.data``, for a
    DTensor its local shard's, for a ZeRO-3 parameter its partition's (``_zero``). ``.data``
    has its own autograd version counter, so writing through it leaves a pending backward
    valid."""
    if isinstance(param, DTensor):
        return param.to_local().data
    if zero.is_zero3(param):
        return zero.local(param)
    return param.data


def full_shape(param: torch.Tensor) -> torch.Size:
    """``param``'s whole shape, also where this rank holds a piece (ZeRO-3's ``.data`` is
    empty outside the forward)."""
    return param.ds_shape if zero.is_zero3(param) else param.shape


def cut(param: torch.Tensor, read) -> torch.Tensor:
    """This rank's piece of a full value of ``param``; ``read(index)`` gives the value, or only
    the rows ``index`` of it (FSDP2: a shard is a block of rows, read without the rest)."""
    if isinstance(param, DTensor):
        return read(shard_index(param))
    whole = read(None)
    return zero.cut(param, whole) if zero.is_zero3(param) else whole


def pieces(state: dict, params: dict) -> dict:
    """``state`` with each full value of a parameter sharded since cut to this rank's piece,
    and cast as the engine cast the parameter (DeepSpeed keeps bf16 partitions of fp32
    weights under ``bf16``: the same rounding of the same values)."""
    out = dict(state)
    for name, value in state.items():
        param = params.get(name)
        if param is None or not is_sharded(param) or value.shape != full_shape(param):
            continue
        piece = local(param)
        if value.shape != piece.shape:
            value = cut(param, lambda index, v=value: v if index is None else v[index])
        if value.dtype != piece.dtype and value.is_floating_point() and piece.is_floating_point():
            value = value.to(piece.dtype)
        out[name] = value
    return out


def release(named: list[tuple[str, torch.Tensor]], model: nn.Module, *, refuse: bool) -> None:
    """Around a swap: free what DeepSpeed ZeRO-3 keeps gathered (see ``_zero.release``)."""
    if named:
        zero.release(named, model, refuse=refuse)


def unusable(param: torch.Tensor) -> str | None:
    """Why fieldkit cannot read or swap ``param`` (a sentence fragment), or None."""
    if DTensor == () and type(param).__name__ == "DTensor":
        return (
            f"DTensors (FSDP2), which fieldkit supports on torch >= 2.6; this is torch "
            f"{torch.__version__}: upgrade torch, or train without sharding"
        )
    if zero.is_zero3(param):
        return zero.unusable(param)
    if type(param).__name__ == "FlatParameter":
        return "FSDP1 flat parameters (FullyShardedDataParallel); use FSDP2 (fully_shard)"
    if isinstance(param, DTensor):
        if all(isinstance(p, (Shard, Replicate)) for p in param.placements):
            return None
        return (
            f"DTensors with placements {param.placements}; only Shard and Replicate are supported"
        )
    if type(param.data) is not torch.Tensor:
        return (
            f"a {type(param.data).__name__}, not a plain tensor; quantized parameters are not "
            "supported"
        )
    return None


def check_still(sharded: bool, model: nn.Module, who: str = "LoraReferenceSnapshot") -> None:
    """Refuse a snapshot (or a tracker's start) of the sharded model on the model unsharded
    again (its pieces cannot make whole tensors). The other way, one taken before
    ``fully_shard`` or ``deepspeed.initialize``, is cut to this rank's pieces (:func:`cut`)."""
    if sharded and not any(is_sharded(p) for p in model.parameters()):
        raise ValueError(
            f"{who}: it was made on the sharded model, and the model is unsharded now: make a "
            "new one. Nothing was changed."
        )


def groups(param: torch.Tensor) -> tuple:
    """The process groups to sum ``param``'s local figures over: one per mesh dimension it is
    sharded on; () when every rank holds all of it."""
    if zero.is_zero3(param):
        return (param.ds_process_group,)
    if not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    return tuple(
        mesh.get_group(dim) for dim, p in enumerate(param.placements) if isinstance(p, Shard)
    )


def shard_index(param: torch.Tensor) -> tuple[slice, ...] | None:
    """Where this rank's shard of ``param`` sits in the full tensor; None when not sharded."""
    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def gather(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``shard`` is this rank's piece, laid out as ``param`` (a
    DTensor) is sharded, on the CPU. A collective: every rank must call it."""
    if zero.is_zero3(param):
        return zero.gather(param, shard)
    if not isinstance(param, DTensor):
        return shard
    local = shard.to(param.to_local().device)
    whole = DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
    return whole.full_tensor().cpu()


def fsdp_modules(model: nn.Module, modules: list[nn.Module] | None = None) -> list[nn.Module]:
    """The FSDP2 modules of ``model`` (or of ``modules``, its modules). FSDP1 is refused here:
    with ``use_orig_params=True`` its parameters look plain but are flat-parameter views that
    it rewrites on every forward."""
    if FSDPModule == ():  # this torch has no FSDP2; its DTensors are refused by `unusable`
        return []
    modules = list(model.modules()) if modules is None else modules
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        raise ValueError(
            "fieldkit does not support FSDP1 flat parameters (FullyShardedDataParallel); use "
            "FSDP2 (torch.distributed.fsdp.fully_shard). Nothing was changed."
        )
    return [m for m in modules if isinstance(m, FSDPModule)]


def reshard(modules: list[nn.Module]) -> None:
    """Free FSDP2's unsharded parameters and register the sharded ones again (after a forward
    FSDP2 keeps the root's unsharded until backward); it all-gathers them when next needed.
    An all-gather still pending (``unshard(async_op=True)``, a prefetch that never ran) is
    landed and dropped first: ``reshard()`` keeps it, and the next forward would use it. Each
    group goes all the way to its sharded state, also where ``reshard()`` would not: a forward
    that raised leaves groups in their forward state, where it keeps the unsharded (root,
    ``reshard_after_forward=False``) or post-forward (an int) copies."""
    for module in modules:
        state = module._get_fsdp_state()
        one = getattr(state, "_fsdp_param_group", None)  # older torch: one group per module
        for group in getattr(state, "_fsdp_param_groups", [one] if one is not None else []):
            if getattr(group, "_all_gather_result", None) is not None:
                group.wait_for_unshard()
            if hasattr(group, "_to_sharded"):
                group._to_sharded()  # a no-op where the group is sharded already
            else:
                group.reshard()


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``dict(model.named_parameters())``, after putting every FSDP2 module in its sharded
    state (so the sharded parameters are the registered ones), in one walk of the tree."""
    modules = list(model.named_modules())
    reshard(fsdp_modules(model, [m for _, m in modules]))
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in modules:
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:  # shared: the first name, as torch
                seen.add(id(param))
                params[f"{prefix}.{name}" if prefix else name] = param
    return params


AGREE_TIMEOUT = timedelta(seconds=300)
"""How long :func:`agree` waits for the other ranks (a checkpoint's collectives have already
lined them up by then)."""


def agree(fn: str) -> None:
    """Before a collective that only some code paths reach (saving): check that every rank of
    the default group called it, where the backend can tell (gloo's ``monitored_barrier``), so
    that a call on one rank only is an error naming the mistake, not a peer's "collective
    mismatch" or "connection reset". Elsewhere (NCCL) it does nothing."""
    dist = torch.distributed
    if dist.get_backend() != "gloo":
        return
    try:
        dist.monitored_barrier(timeout=AGREE_TIMEOUT)
    except RuntimeError as e:
        raise RuntimeError(
            f"{fn}: this is a collective under sharding (FSDP2, ZeRO-3), so every rank must "
            f"call it, and not every rank did within {AGREE_TIMEOUT.total_seconds():g} s "
            f"({e}). Call it on every rank, not under `if rank == 0:`; rank 0 alone writes."
        ) from None


def reduce_device(over: tuple, device: torch.device) -> torch.device:
    """Where a reduction over the groups ``over`` must run: NCCL takes CUDA tensors only (a
    CPU-offloaded shard's figures go to this rank's GPU), gloo and the rest ``device``."""
    if any("nccl" in str(torch.distributed.get_backend(g)) for g in over) and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def before_shard_writes(shards: list[torch.Tensor]) -> None:
    """Wait until FSDP2 has no copy in flight that reads ``shards``: with ``CPUOffloadPolicy``
    it moves CPU shards to the GPU with non-blocking copies, which a CPU write would race."""
    if any(t.device.type == "cpu" for t in shards) and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def after_shard_writes(shards: list[torch.Tensor]) -> None:
    """Make writes into CUDA ``shards`` (queued on the current stream) visible to FSDP2, whose
    all-gathers run on its own streams and do not wait for the current one."""
    for device in {t.device for t in shards if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()


def all_reduce(sq: torch.Tensor, mx: torch.Tensor, over: tuple) -> None:
    """Sum ``sq`` and max ``mx`` (one-element tensors) over each process group, in place."""
    for group in over:
        torch.distributed.all_reduce(sq, torch.distributed.ReduceOp.SUM, group=group)
        torch.distributed.all_reduce(mx, torch.distributed.ReduceOp.MAX, group=group)
