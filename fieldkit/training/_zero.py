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

import torch
import torch.distributed as dist

from ._names import keys


def is_zero3(param: torch.Tensor) -> bool:
    return getattr(param, "ds_tensor", None) is not None and hasattr(param, "ds_id")


def span(param: torch.Tensor) -> tuple[int, int]:
    """Where this rank's piece starts in the flattened tensor, and how much of it is valid
    (kept on the parameter, beside DeepSpeed's own ``ds_*`` attributes: it never changes)."""
    found = getattr(param, "fieldkit_span", None)
    if found is None:
        n = param.ds_tensor.numel()
        start = dist.get_rank(group=param.ds_process_group) * n
        found = param.fieldkit_span = (start, max(0, min(n, param.ds_numel - start)))
    return found


def local(param: torch.Tensor) -> torch.Tensor:
    return param.ds_tensor.data.narrow(0, 0, span(param)[1])


def cut(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``whole``, a full value of ``param``."""
    start, valid = span(param)
    return whole.reshape(-1).narrow(0, start, valid)


def unusable(param: torch.Tensor) -> str | None:
    if getattr(param, "ds_secondary_tensor", None) is not None:
        return "DeepSpeed ZeRO++ hierarchical partitions (zero_hpz_partition_size > 1)"
    location = getattr(param.ds_tensor, "final_location", None)
    if location is not None:  # None: the partition stays where the parameter lives
        where = "NVMe" if str(location).lower() == "nvme" else "the CPU"
        return (
            f"DeepSpeed ZeRO-3 parameters offloaded to {where} (offload_param), which fieldkit "
            "does not support yet; keep offload_param off (offload_optimizer is fine)"
        )
    return None


def gather(param: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``piece`` is this rank's, on the CPU. A collective."""
    group = param.ds_process_group
    padded = torch.zeros(param.ds_tensor.numel(), dtype=piece.dtype, device=param.ds_tensor.device)
    padded[: piece.numel()] = piece.reshape(-1)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()


def release(named: list[tuple[str, torch.Tensor]], *, refuse: bool) -> None:
    """Free the full values DeepSpeed holds gathered of ``named`` ZeRO-3 parameters (persistent
    ones, and what a forward left), so that the next forward gathers the pieces. With
    ``refuse``, first raise (nothing changed) where a full value is not DeepSpeed's to free:
    gathered by the user (``GatheredParameters``, which marks them) or still in flight."""
    held = [(n, p) for n, p in named if p.ds_status.name != "NOT_AVAILABLE"]
    if not held:
        return
    busy = [n for n, p in held if p.ds_status.name == "INFLIGHT" or getattr(p, _GATHERED, 0)]
    if refuse and busy:
        raise ValueError(
            f"parameter(s) {keys(busy)} are gathered by deepspeed.zero.GatheredParameters (or "
            "in flight): the forward would read the gathered values, not the ones the swap "
            "writes. Swap outside GatheredParameters. Nothing was changed."
        )
    params = [p for _, p in held]
    params[0].partition(param_list=params, has_been_updated=False)


_GATHERED = "_ds_z3_gathered_param_context_depth"
"""What DeepSpeed's GatheredParameters sets on the parameters it holds gathered (0.19)."""
