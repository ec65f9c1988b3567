"""The few collectives the worker loop uses, written once; each is a no-op in a one-worker run."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group of more than one rank (DDP under Ray Train)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.MAX) -> torch.Tensor:
    """In place over every rank (MAX by default: a flag raised on any rank is raised on all)."""
    if is_distributed():
        dist.all_reduce(t, op=op)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP sends them at the start of each training
    forward, but the last forward updates each rank's copy from its own batch: without this, the ranks would
    evaluate with different statistics than the checkpoint holds (rank 0's)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects_to_rank0(obj: object) -> tuple[int, list[object] | None]:
    """(this rank, every rank's `obj` on rank 0 / None elsewhere)."""
    if not is_distributed():
        return 0, [obj]
    rank = dist.get_rank()
    gathered: list[object] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return rank, gathered
