"""``ds=auto``: the ZeRO stage a run needs, chosen from the world size and the model's size.

ZeRO buys memory with bookkeeping. On one rank there is nothing to shard, and the bookkeeping is pure cost:
ZeRO-1 on one CPU rank copies every gradient into and out of flat buckets, divides them and steps AdamW over
a flat fp32 partition, which made a ViT-B step 1.4–2.1× the plain-torch step depending on the sitting
(``PERF_NOTES.md``: 1.41 s of copies alone), while ZeRO-0 runs within about 10% of it. With several ranks,
the cheapest stage whose model states fit is chosen, in the order ZeRO-0, ZeRO-1, ZeRO-2, ZeRO-3: on 2 CPU
ranks a ViT-B step took 4.35 / 5.04 / 5.59 s under ZeRO-0 / 1 / 2 (docs/performance.md), so sharding is
bought only when memory needs it.

Model states per rank for P parameters on N ranks, as this project trains them (fp32 weights with
bf16 autocast, or fp32; AdamW):

| state | bytes | partitioned over N from |
| --- | --- | --- |
| parameters (fp32) | 4P | ZeRO-3 |
| gradients (fp32) | 4P | ZeRO-2 |
| optimizer: fp32 master partition + Adam exp_avg + exp_avg_sq | 4P + 8P (ZeRO >= 1), 8P (ZeRO-0) | ZeRO-1 |

ZeRO keeps its own fp32 copy of each rank's partition beside the module's weights (it cannot alias
them), hence the master term. Offload moves parameters and/or optimizer states to host memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"
# Model states may take this share of a rank's memory; activations, buffers and the allocator need the rest.
STATE_BUDGET = 0.4


def model_state_bytes(
    num_params: int,
    world_size: int,
    stage: int,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    master_copy: bool = True,
) -> dict[str, dict[str, int]]:
    """Bytes per rank of parameters, gradients and optimizer states, on the device and on the host.
    ``master_copy=False``: a sharding that steps the module's own fp32 weights (fairscale's OSS and FSDP) and
    keeps no separate fp32 partition."""
    n = max(world_size, 1)
    params = 4 * num_params // (n if stage >= 3 else 1)
    grads = 4 * num_params // (n if stage >= 2 else 1)
    optimizer = (12 if stage >= 1 and master_copy else 8) * num_params // (n if stage >= 1 else 1)
    device = {
        "params": 0 if offload_param else params,
        "grads": grads,
        "optimizer": 0 if offload_optimizer else optimizer,
    }
    host = {"params": params if offload_param else 0, "grads": 0, "optimizer": optimizer if offload_optimizer else 0}
    device["total"] = sum(device.values())
    host["total"] = sum(host.values())
    return {"device": device, "host": host}


def local_world_size(world_size: int) -> int:
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``; without it, all ranks are taken to be here)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def rank_memory_bytes(local_world_size: int) -> int:
    """Memory one rank may use: its GPU's, or on the CPU the machine's RAM shared by the ranks on this node."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(local_world_size, 1)


def choose_stage(num_params: int, world_size: int, memory_bytes: int) -> tuple[str, str]:
    """``(ds name, why)`` for ``ds=auto``."""
    if world_size == 1:
        return "zero0", "one rank: nothing to shard, and ZeRO's flat-buffer bookkeeping would only cost time"
    budget = STATE_BUDGET * memory_bytes
    for stage in (0, 1, 2, 3):
        need = model_state_bytes(num_params, world_size, stage)["device"]["total"]
        if need <= budget or stage == 3:
            fits = "fit" if need <= budget else "do not fit even sharded; try ds=zero3_offload"
            return (
                f"zero{stage}",
                f"{world_size} ranks: the cheapest stage whose model states ({need / 2**30:.1f} GiB per rank) "
                f"{fits} in {STATE_BUDGET:.0%} of a rank's {memory_bytes / 2**30:.0f} GiB",
            )
    raise AssertionError("unreachable")


def recorded_ds(resume: Any, checkpoints: Path) -> str | None:
    """The concrete ``ds`` the checkpoint ``train.resume`` would continue from, as recorded in its config.json
    (not verified here: the checkpointer verifies it before loading)."""
    if resume in ("none", "", None, False):
        return None
    if resume == AUTO:
        latest = checkpoints / "latest"
        if not latest.is_file():
            return None
        folder = checkpoints / latest.read_text().strip()
    else:
        folder = Path(resume)
    try:
        ds = json.loads((folder / "config.json").read_text()).get("ds")
    except (OSError, ValueError, AttributeError):
        return None
    return ds if isinstance(ds, str) and ds != AUTO else None


def zero_stage(ds: str) -> int | None:
    """The ZeRO stage of a concrete ``ds`` (a shipped name or a JSON path), or None when it cannot be read."""
    from .setup import load_ds_config

    try:
        stage = load_ds_config(ds).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


# DeepSpeed's checkpoint layout per ZeRO stage: ZeRO-0 keeps the optimizer in the model states, ZeRO-1 and 2
# share flat per-rank partitions (one loads into the other), ZeRO-3 partitions the parameters too.
_CHECKPOINT_LAYOUT = {0: "whole", 1: "partitioned optimizer", 2: "partitioned optimizer", 3: "partitioned parameters"}


def refuse_another_stage(ds: str, recorded: str) -> None:
    """An explicit ``ds`` whose ZeRO stage lays its checkpoint out differently from the resumed checkpoint's stage:
    DeepSpeed cannot load one into the other, so say so before anything is built."""
    from .checkpoint import NoUsableCheckpoint

    wanted, written = zero_stage(ds), zero_stage(recorded)
    if wanted is not None and written is not None and _CHECKPOINT_LAYOUT[wanted] != _CHECKPOINT_LAYOUT[written]:
        raise NoUsableCheckpoint(
            f"ds={ds}: the checkpoint to resume was written with ds={recorded} (ZeRO stage {written}) and DeepSpeed "
            f"cannot load it into stage {wanted}; pass ds={recorded} (or ds=auto, which keeps the checkpoint's "
            "stage), or start over with train.resume=none"
        )


def resolve_ds(
    ds: str, num_params: int, world_size: int, local_world_size: int, recorded: str | None = None
) -> tuple[str, str | None]:
    """``(concrete ds, why)``: ``ds`` itself unless it is ``auto``. A resumed ``auto`` run keeps the stage its
    checkpoint was written with, so a run never changes its checkpoint format halfway."""
    if ds != AUTO:
        return ds, None
    if recorded is not None:
        return recorded, "the stage the resumed checkpoint was written with"
    return choose_stage(num_params, world_size, rank_memory_bytes(local_world_size))


def resolve_for_run(ds: str, num_params: int, world_size: int, rank: int, resume: Any, checkpoints: Path) -> str:
    """``resolve_ds`` for a run about to start (``train.resume`` and its checkpoint folder say what it continues),
    printing the choice on rank 0 when ``auto`` made one."""
    recorded = recorded_ds(resume, checkpoints)
    if recorded is not None and ds != AUTO:
        refuse_another_stage(ds, recorded)
    resolved, why = resolve_ds(ds, num_params, world_size, local_world_size(world_size), recorded)
    if why is not None and rank == 0:
        print(f"[adamae] ds={ds} → {resolved}: {why}", flush=True)
    return resolved
