"""The few collective operations the engine-independent code needs (checkpoints, the non-finite guard,
evaluation): each is a no-op without a process group, so the same code runs in one process."""

from __future__ import annotations

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


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """``flag`` or'ed over all ranks."""
    if not _active():
        return flag
    if device is None or (dist.get_backend() == "nccl" and device.type != "cuda"):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    packed = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item() > 0)


__all__ = ["any_rank", "barrier", "gather_objects", "rank_and_world"]
