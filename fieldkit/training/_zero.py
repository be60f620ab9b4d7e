"""DeepSpeed ZeRO-3 parameters, as fieldkit reads and writes them.

Under ZeRO-3 a parameter's ``.data`` is empty outside the forward; ``p.ds_tensor`` holds this
rank's piece of the flattened tensor (padded to equal pieces), and the forward all-gathers the
pieces. fieldkit's local tensor is the valid (unpadded) part of that piece: a swap writes it,
the delta measures it (summed over ``p.ds_process_group``), ``from_disk`` reads it from the
file. Parameters DeepSpeed keeps gathered (``ds_persist``: those under
``stage3_param_persistence_threshold``) are released around a swap, so the forward gathers the
pieces fieldkit wrote, and again after it, so the policy's next forward gathers its own.
Nothing here imports DeepSpeed: a parameter is recognised by the attributes DeepSpeed sets.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from ._names import keys


def is_zero3(param: torch.Tensor) -> bool:
    return getattr(param, "ds_tensor", None) is not None and hasattr(param, "ds_id")


def optimizers(params: list[torch.Tensor]) -> list:
    """DeepSpeed's ZeRO optimizers that step ``params`` through fp32 master partitions of their
    own. ZeRO-3 links each parameter to its optimizer (``_z3_optimizer``), ZeRO-1/2 only with
    CPU offload (``_zero_optimizer``); otherwise the optimizer is found as the owner of the flat
    fp32 partition that a parameter's fragment (``_hp_mapping``) is a view of: one search of
    the heap, made when a swap is planned, and only for such parameters."""
    found, bases = {}, {}
    for p in params:
        owner = getattr(p, "_z3_optimizer", None) or getattr(p, "_zero_optimizer", None)
        mapping = getattr(p, "_hp_mapping", None)
        if owner is not None:
            found[id(owner)] = owner
        elif mapping is not None and mapping.hp_fragment._base is not None:
            bases[id(mapping.hp_fragment._base)] = mapping.hp_fragment._base
    for base in bases.values():
        for group in gc.get_referrers(base):
            if isinstance(group, list):
                found.update((id(o), o) for o in _owners(group) if hasattr(o, "bit16_groups"))
    return list(found.values())


def _owners(obj: object):
    for r in gc.get_referrers(obj):
        if isinstance(r, dict):  # Python 3.10: an instance's __dict__
            yield from (o for o in gc.get_referrers(r) if getattr(o, "__dict__", None) is r)
        else:
            yield r


def span(param: torch.Tensor) -> tuple[int, int]:
    """Where this rank's piece starts in the flattened tensor, and how much of it is valid
    (kept on the parameter, beside DeepSpeed's own ``ds_*`` attributes: it never changes)."""
    found = getattr(param, "fieldkit_span", None)
    if found is None:
        n = param.ds_tensor.numel()
        # With more ranks than elements to spare, a rank's piece may be all padding.
        start = min(dist.get_rank(group=param.ds_process_group) * n, param.ds_numel)
        found = param.fieldkit_span = (start, min(n, param.ds_numel - start))
    return found


def local(param: torch.Tensor) -> torch.Tensor:
    return param.ds_tensor.data.narrow(0, 0, span(param)[1])


def cut(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``whole``, a full value of ``param``."""
    start, valid = span(param)
    return whole.reshape(-1).narrow(0, start, valid)


def unusable(param: torch.Tensor) -> str | None:
    # hpZ: the secondary tensor comes and goes with every step; its process group stays.
    if (
        getattr(param, "ds_zero_param_process_group", None) is not None
        or getattr(param, "ds_secondary_tensor", None) is not None
    ):
        return "DeepSpeed ZeRO++ hierarchical partitions (zero_hpz_partition_size > 1)"
    if getattr(param.ds_tensor, "ds_quant_scale", None) is not None or _quantized(param):
        return (
            "DeepSpeed ZeRO-3 quantized weights (zero_quantized_weights or "
            "zero_quantized_nontrainable_weights), which fieldkit does not support"
        )
    location = getattr(param.ds_tensor, "final_location", None)
    if location is not None:  # None: the partition stays where the parameter lives
        where = "NVMe" if str(location).lower() == "nvme" else "the CPU"
        return (
            f"DeepSpeed ZeRO-3 parameters offloaded to {where} (offload_param), which fieldkit "
            "does not support yet; keep offload_param off (offload_optimizer is fine)"
        )
    return None


def _quantized(param: torch.Tensor) -> bool:
    """Whether DeepSpeed quantizes ``param``'s all-gathers (its optimizer's coordinator says)."""
    offload = getattr(getattr(param, "_z3_optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    return bool(
        getattr(coordinator, "zero_quantized_weights", False)
        or getattr(coordinator, "zero_quantized_nontrainable_weights", False)
    )


def gather(param: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``piece`` is this rank's, on the CPU. A collective."""
    group = param.ds_process_group
    padded = torch.zeros(param.ds_tensor.numel(), dtype=piece.dtype, device=param.ds_tensor.device)
    padded[: piece.numel()] = piece.reshape(-1)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()


def release(named: list[tuple[str, torch.Tensor]], model: torch.nn.Module, *, refuse: bool) -> None:
    """Free the full values DeepSpeed holds gathered of ``named`` ZeRO-3 parameters of
    ``model``, so that the next forward gathers the pieces: persistent ones, what a forward
    left (one that raised leaves its parameters marked active: a forward that never finishes
    cannot need them), and what a prefetch has in flight (waited for and retired from
    DeepSpeed's registry first, so no gather still reads a piece fieldkit writes). With
    ``refuse``, first raise (nothing changed) where the full value is the user's: gathered by
    ``GatheredParameters``, which marks them."""
    held = [(n, p) for n, p in named if p.ds_status.name != "NOT_AVAILABLE"]
    if not held:
        return
    theirs = [n for n, p in held if getattr(p, _GATHERED, 0)]
    if refuse and theirs:
        raise ValueError(
            f"parameter(s) {keys(theirs)} are gathered by deepspeed.zero.GatheredParameters: "
            "the forward would read the gathered values, not the ones the swap writes. Swap "
            "outside GatheredParameters. Nothing was changed."
        )
    params = [p for _, p in held]
    _land([p for p in params if p.ds_status.name == "INFLIGHT"], model)
    for p in params:
        p.ds_active_sub_modules.clear()
    params[0].partition(param_list=params, has_been_updated=False)


def _land(params: list[torch.Tensor], model: torch.nn.Module) -> None:
    """Wait for the all-gathers in flight of ``params`` (a prefetch) and take them out of
    DeepSpeed's in-flight registry (on the engine's module), so that DeepSpeed gathers them
    again when it needs them rather than waiting on a handle that is done."""
    if not params:
        return
    registry = next(
        (r for m in model.modules() if (r := m.__dict__.get("ds_inflight_param_registry"))), {}
    )
    for p in params:
        handle = registry.pop(p, None)
        if handle is None:
            raise RuntimeError(
                f"parameter {p.ds_summary()} is in flight outside DeepSpeed's registry: "
                "fieldkit cannot wait for it. Nothing was changed."
            )
        handle.wait()
    for device in {p.device for p in params if p.is_cuda}:
        torch.cuda.synchronize(device)  # the gathers ran on DeepSpeed's stream


_GATHERED = "_ds_z3_gathered_param_context_depth"
"""What DeepSpeed's GatheredParameters sets on the parameters it holds gathered (0.19)."""
