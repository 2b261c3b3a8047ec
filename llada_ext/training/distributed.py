"""Multi-process training helpers: process-group setup, DDP / FSDP2 wrapping, collectives.

The trainer runs unchanged under ``torchrun --nproc-per-node N``: ranks come from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), the backend is NCCL on
CUDA and Gloo on the CPU. With ``fsdp=True`` every transformer block and the root are sharded
with ``torch.distributed.fsdp.fully_shard`` (FSDP2), for models whose weights, gradients and
optimizer state do not fit on one GPU; checkpoints are then written shard by shard with
``torch.distributed.checkpoint`` (:mod:`llada_ext.training.dcp`).

The global batch (sequences per optimizer step) is a setting of the run, not of the launch:
:func:`split_global_batch` turns it into gradient accumulation steps for the world size at
hand, so a run resumed on more or fewer processes keeps its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import check_positive_ints

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_max_flag",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "full_model_state_dict",
    "full_state_dicts",
    "gather_objects",
    "init_distributed",
    "load_full_state_dicts",
    "split_global_batch",
    "wrap_for_training",
]


@dataclass
class DistInfo:
    """Where this process sits in the job.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank, number of processes, rank on this node.
    device : torch.device
        The device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files and shows progress)."""
        return self.rank == 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given.

    Parameters
    ----------
    device : str, torch.device or None
        Requested device.

    Returns
    -------
    torch.device
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    return dev


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process info.

    Parameters
    ----------
    device : str, torch.device or None
        Requested device type ("auto", "cpu", "cuda"); under torchrun each rank uses
        ``cuda:LOCAL_RANK``.

    Returns
    -------
    DistInfo
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1 and not dist.is_initialized():
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev
    )


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (``t`` itself when not distributed).

    Parameters
    ----------
    t : torch.Tensor
        Same shape on every rank.

    Returns
    -------
    torch.Tensor
        A new tensor.
    """
    if not _active():
        return t.clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (e.g. "stop requested")."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0.

    Returns
    -------
    list or None
        The objects in rank order on rank 0 (``[obj]`` when not distributed), None elsewhere.
    """
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order, on every rank (``[obj]`` alone)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_training(
    objective: nn.Module, model: nn.Module, info: DistInfo, *, fsdp: bool, bf16: bool
) -> nn.Module:
    """Wrap the loss module for data-parallel training.

    Parameters
    ----------
    objective : nn.Module
        The :class:`~llada_ext.training.losses.MaskedLMObjective` holding ``model``.
    model : nn.Module
        The LLaDA model inside it (its blocks become FSDP units).
    info : DistInfo
        This process's place in the job.
    fsdp : bool
        Shard parameters, gradients and optimizer state with FSDP2 instead of replicating.
    bf16 : bool
        With FSDP: compute in bfloat16 and reduce gradients in float32 (FSDP's own mixed
        precision; the trainer then skips autocast).

    Returns
    -------
    nn.Module
        The module to call in the training step (``objective`` itself when not distributed
        and not sharded).
    """
    if fsdp:
        if not info.is_distributed:
            raise ValueError("FSDP needs several processes: launch with torchrun")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in model.model.transformer.blocks:
            fully_shard(block, mp_policy=mp)
        # The root unit holds the embedding, final norm and LM head; the fused loss reads the
        # LM-head weight inside the objective's forward, where the root is unsharded.
        fully_shard(objective, mp_policy=mp)
        return objective
    if not info.is_distributed:
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(objective, device_ids=device_ids)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, fsdp: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state dicts, tensors on the CPU.

    With FSDP this is a collective (every rank must call it); the result is complete on rank
    0 only.

    Parameters
    ----------
    model : nn.Module
        The LLaDA model (not the wrapper), so keys are the published weight names.
    optimizer : torch.optim.Optimizer
        Its optimizer.
    fsdp : bool
        Whether the parameters are FSDP2-sharded.

    Returns
    -------
    tuple of (dict, dict)
        Model and optimizer state dicts.
    """
    if not fsdp:
        msd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        osd = _to_cpu(optimizer.state_dict())
        return msd, osd
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return msd, osd


def full_model_state_dict(model: nn.Module, *, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full model state dict on the CPU (with FSDP a collective, complete on rank 0)."""
    if not fsdp:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def _divisors(n: int, limit: int = 12) -> str:
    """'1, 2, 3 or 6': the divisors of `n` (the first `limit` of them)."""
    found = [str(d) for d in range(1, n + 1) if n % d == 0]
    if len(found) > limit:
        return ", ".join(found[:limit]) + ", ..."
    return found[0] if len(found) == 1 else ", ".join(found[:-1]) + " or " + found[-1]


def split_global_batch(global_batch: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that keep ``global_batch`` sequences per optimizer step.

    Parameters
    ----------
    global_batch : int
        Sequences per optimizer step over all ranks.
    micro_batch_size : int
        Sequences per forward/backward per rank.
    world_size : int
        Number of processes.

    Returns
    -------
    int
        ``global_batch // (world_size * micro_batch_size)``.

    Raises
    ------
    ValueError
        When ``global_batch`` is not a multiple of ``world_size * micro_batch_size``; the
        message lists the micro-batch sizes and world sizes that would keep it.
    """
    check_positive_ints(
        global_batch=global_batch, micro_batch_size=micro_batch_size, world_size=world_size
    )
    per_pass = micro_batch_size * world_size
    if global_batch % per_pass == 0:
        return global_batch // per_pass
    procs = f"{world_size} process" + ("es" if world_size != 1 else "")
    if global_batch % world_size == 0:
        micro = (
            f"micro_batch_size (--batch-size) {_divisors(global_batch // world_size)} with {procs}"
        )
    else:
        micro = (
            f"no micro_batch_size with {procs} ({global_batch} is not a multiple of {world_size})"
        )
    if global_batch % micro_batch_size == 0:
        worlds = (
            f"{_divisors(global_batch // micro_batch_size)} processes with micro_batch_size "
            f"{micro_batch_size}"
        )
    else:
        worlds = f"no world size with micro_batch_size {micro_batch_size} (it does not divide it)"
    raise ValueError(
        f"global_batch {global_batch} (sequences per optimizer step) cannot be kept with "
        f"{procs} x micro_batch_size {micro_batch_size}: it must be a multiple of "
        f"world_size * micro_batch_size = {per_pass}. Sizes that work: {micro}; {worlds}"
    )


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    *,
    fsdp: bool,
) -> None:
    """Load full state dicts written by :func:`full_state_dicts` (every rank calls this).

    The optimizer state may be keyed by parameter index (``optimizer.state_dict()``, single
    process and DDP) or by parameter name (FSDP2's full state dict): it is re-keyed by position
    to what this run needs, so a checkpoint of either kind loads with or without FSDP.

    Parameters
    ----------
    model : nn.Module
        The LLaDA model.
    optimizer : torch.optim.Optimizer
        Its optimizer (already built over the model's parameters).
    model_state, optim_state : dict
        Full state dicts (same on every rank).
    fsdp : bool
        Whether the parameters are FSDP2-sharded.
    """
    optim_state = _rekey_optimizer_state(model, optimizer, optim_state, by_name=fsdp)
    if not fsdp:
        model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=opts
    )


def _rekey_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *, by_name: bool
) -> dict[str, Any]:
    """``state`` with its parameter keys replaced, position by position, by this optimizer's
    parameter names (``by_name``) or indices (what ``optimizer.load_state_dict`` expects)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise ValueError(
            "the checkpoint's optimizer state does not match the model's parameter groups"
        )
    keys: dict[Any, Any] = {}
    new_groups = []
    for group, own in zip(saved, groups):
        start = len(keys)
        new = own if by_name else list(range(start, start + len(own)))
        keys.update(zip(group["params"], new))
        new_groups.append({**group, "params": new})
    return {"state": {keys[k]: v for k, v in state["state"].items()}, "param_groups": new_groups}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj
