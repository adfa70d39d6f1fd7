"""Every collective operation outside the engines' own (the trainer's scalars, checkpoints, the non-finite
guard, the data stream's position and corrupt counts, evaluation): each is a no-op without a process group of
more than one rank, so the same code runs in one process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if _active():
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a one-item list without a process group)."""
    if not _active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _device() -> torch.device:
    """Where a collective's tensor must live: the current CUDA device under NCCL, else the host."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(
    values: Sequence[float], op: str = "sum", dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> list[Any]:
    """``values`` summed (``op="sum"``) or maxed (``"max"``) element-wise over the ranks, computed in ``dtype``."""
    if not _active() or not values:
        return list(values)
    packed = torch.tensor(list(values), dtype=dtype, device=device or _device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return packed.tolist()


def all_gather(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (integers, the same length on every rank), in rank order."""
    if not _active():
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.long, device=_device())
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    return [row.tolist() for row in rows]


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """``flag`` or'ed over all ranks."""
    if not _active():
        return flag
    if device is None or (dist.get_backend() == "nccl" and device.type != "cuda"):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    packed = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item() > 0)


__all__ = ["all_gather", "all_reduce", "any_rank", "barrier", "gather_objects", "rank_and_world"]
