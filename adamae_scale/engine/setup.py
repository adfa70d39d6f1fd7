"""Wrap a plain ``nn.Module`` for training: process group, DeepSpeed config, ``deepspeed.initialize``.

The model knows nothing of this module; everything DeepSpeed-specific happens here, in one order:
environment → config (ZeRO JSON + batch, clipping and precision fields) → activation checkpointing →
``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.utils.checkpoint
from torch import nn

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def dist_env() -> DistEnv:
    """The rank layout set by a launcher (deepspeed, torchrun, SLURM via srun), or a single process.

    With no launcher, the variables DeepSpeed's process group needs are filled in for one process.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "0" if os.environ["WORLD_SIZE"] == "1" else "29500"
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def launch_rank() -> int:
    """This process's global rank as its launcher set it (``RANK``; ``SLURM_PROCID`` under srun), read without
    changing the environment: 0 for a single process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0"))


def accelerator() -> str:
    """The accelerator a run trains on: ``DS_ACCELERATOR`` if set, else CUDA when present, else the CPU."""
    return os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def select_accelerator() -> str:
    """``accelerator()``, recorded in ``DS_ACCELERATOR`` for DeepSpeed. Must run before DeepSpeed is first
    imported."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator())
    quiet_compiler_probes()
    return os.environ["DS_ACCELERATOR"]


def quiet_compiler_probes() -> None:
    """DeepSpeed finds out whether an optional op could be built by compiling a small C program (``gcc ...
    test.c``, e.g. for libaio); setuptools logs each compiler command at INFO, which Hydra prints on the console
    and writes into the run's log. They are not the run's news: that logger keeps warnings and errors only."""
    logging.getLogger("compilers").setLevel(logging.WARNING)


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` runs bf16 matmuls in hardware: CUDA from compute capability 8.0 (A100, H100), CPUs
    with AVX-512 or AMX (oneDNN's bf16 kernels). Elsewhere torch emulates them far below the fp32 speed."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def slow_bf16_warning(precision: str, device_type: str) -> str | None:
    """The line to print at start when ``precision=bf16`` meets a device without native bf16 matmuls."""
    if precision != "bf16" or native_bf16(device_type):
        return None
    where = (
        f"this CPU ({torch.backends.cpu.get_cpu_capability()}: no AVX-512 or AMX)"
        if device_type == "cpu"
        else f"{device_type} device without native bf16 (compute capability below 8.0)"
    )
    return (
        f"[adamae] warning: precision=bf16 on {where}: bf16 matmuls are emulated, a step takes many times longer "
        "than with precision=fp32 (ViT-B on a 2-core AVX2 CPU: 44.9 s against 2.9 s); pass precision=fp32 here"
    )


def warn_if_slow_bf16(precision: str, file: TextIO | None = None) -> None:
    """Print ``slow_bf16_warning`` for this process's accelerator, if there is one, to ``file`` (stdout)."""
    warning = slow_bf16_warning(precision, accelerator())
    if warning:
        print(warning, file=file or sys.stdout, flush=True)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings, unless ``MALLOC_*`` variables already chose or the C library is not
    glibc. Returns whether they were applied."""
    if any(key.startswith("MALLOC_") for key in os.environ) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, …)
        return False
    return all([bool(libc.mallopt(param, value)) for param, value in settings])


def limit_host_heap_growth(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Make freed host buffers over ``mmap_threshold`` go back to the OS (glibc), unless ``MALLOC_*``
    variables already chose. Returns whether the setting was applied."""
    return _mallopt((_M_MMAP_THRESHOLD, mmap_threshold), (_M_ARENA_MAX, arenas))


def keep_freed_host_buffers() -> bool:
    """Serve every host buffer from glibc's heap and never give freed memory back (``M_MMAP_MAX=0``, no
    trimming), unless ``MALLOC_*`` variables already chose. Returns whether the setting was applied.

    glibc maps each buffer over 32 MB (its largest mmap threshold) afresh and unmaps it when freed, so every
    large activation of every step is page-faulted in again: a ViT-B micro-batch of 8 allocates dozens of
    38-154 MB tensors per step. Kept in the heap, they are reused as they are.
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def tune_host_allocator(partitions_weights: bool) -> str | None:
    """How glibc should serve a CPU training's tensors; nothing on GPUs (their tensors are not in host memory).
    Returns the setting applied: ``"release"``, ``"retain"`` or ``None`` (GPU, not glibc, ``MALLOC_*`` set).

    - Partitioned weights, e.g. ZeRO-3 (``"release"``, ``limit_host_heap_growth``): every weight matrix is
      gathered and freed each step. glibc serves buffers under its adaptive mmap threshold (up to 32 MB:
      most ViT-H matrices) from per-thread heaps it does not give back, so the gathered model piles up: a
      2-rank vit_huge run grew past 11 GB per rank and was OOM-killed, and peaks at 9.2 GB per rank with this.
    - Every other stage and engine (``"retain"``, ``keep_freed_host_buffers``) allocates the same large
      activations every step: reusing them instead of faulting fresh pages in took a ViT-B step (bf16,
      micro-batch 8, 2 threads) from 15.8 to 11.8 s for 3% more peak memory, and ViT-L (micro-batch 4) from
      15.4 to 11.1 s. Mapping every buffer over 1 MB instead, as for ZeRO-3, costs a small model's CPU
      training ~30% in page faults.
    """
    if select_accelerator() != "cpu":
        return None
    if partitions_weights:
        return "release" if limit_host_heap_growth() else None
    return "retain" if keep_freed_host_buffers() else None


def init_distributed(engine: str = "deepspeed") -> None:
    """Start the process group (gloo on CPU, NCCL on GPU) before the engine, so that pre-engine
    work (checkpoint conversion) can synchronise ranks. DeepSpeed's own start-up for its engine; plain
    ``torch.distributed`` for the others (fairscale), which then never import DeepSpeed."""
    accelerator = select_accelerator()
    if engine != "deepspeed":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if accelerator == "cuda" else "gloo")
        return
    import deepspeed

    if accelerator == "cpu":
        skip_cpu_inference_comm_op()
    deepspeed.init_distributed()


def skip_cpu_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op when the process group starts
    (C++, 50-75 s on a 2-core machine at every fresh checkout, and again whenever another ``ninja`` is on the
    PATH): only tensor-parallel inference (``inference_all_reduce``) uses it, and without it that call falls
    back to the process group, as DeepSpeed does where the op is not compatible. Training never calls it.
    A DeepSpeed without this switch builds the op as before."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """``zero0`` … ``zero3`` (shipped in ``ds_configs/``) or a path to a DeepSpeed JSON file. ``auto`` is
    resolved to one of them first (``stage.resolve_ds``); here it reads as ``zero0`` for validation."""
    if name_or_path == "auto":
        name_or_path = "zero0"
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"ds: DeepSpeed config file {path} does not exist")
        text = path.read_text()
    else:
        shipped = resources.files("adamae_scale.ds_configs").joinpath(f"{name_or_path}.json")
        if not shipped.is_file():
            names = sorted(
                p.name[:-5] for p in resources.files("adamae_scale.ds_configs").iterdir() if p.name.endswith(".json")
            )
            raise ValueError(f"ds={name_or_path!r}: expected one of {names} or a path to a .json file")
        text = shipped.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"ds={name_or_path}: not valid JSON ({err})") from err


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") in ("cpu", "nvme")


def build_ds_config(
    base: dict[str, Any],
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    precision: str,
    clip_grad: float,
) -> dict[str, Any]:
    """The ZeRO JSON plus the fields this project owns: batch sizes, clipping, precision, logging.

    ``global_batch = micro_batch_size × accumulation × world_size``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = copy.deepcopy(base)
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch_size * accumulation * world_size,
        gradient_clipping=clip_grad,
        steps_per_print=10**9,  # progress is reported by the trainer
        wall_clock_breakdown=False,
    )
    # bf16 keeps fp32 parameters and runs matmuls under torch.autocast, so the sampler can stay fp32;
    # DeepSpeed's "bf16" mode would cast every parameter, the sampler's included, to bf16.
    config.pop("bf16", None)
    config.pop("fp16", None)
    config["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16"}
    if offloads_optimizer(config):  # a CPU-only run offloads to torch's fused AdamW (``optim.adamw``)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def apply_activation_checkpointing(blocks: Iterable[nn.Module], every: int) -> int:
    """Recompute every ``every``-th block's activations in backward instead of storing them.

    The block's ``forward`` is replaced on the instance, so parameter names (and therefore
    checkpoints) are unchanged; the recomputation goes through the block's sub-modules, so ZeRO-3
    gathers their parameters again. RNG state is replayed, so dropout masks match. Returns how many
    blocks were wrapped.
    """
    chosen = checkpointed_blocks(blocks, every)
    for block in chosen:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return len(chosen)


def checkpointed_blocks(blocks: Iterable[nn.Module], every: int) -> list[nn.Module]:
    """The blocks ``model.checkpoint_every=every`` recomputes, whatever the engine: the 1st, the ``every+1``-th ...
    (none for ``every <= 0``)."""
    return [block for index, block in enumerate(blocks) if every > 0 and index % every == 0]


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """``torch.compile`` each block's ``forward`` in place. Call it before ``apply_activation_checkpointing``,
    which then checkpoints the compiled function (the other order leaves nothing compiled: dynamo does not trace
    into ``torch.utils.checkpoint`` called from a module's ``__call__``). Parameter names, and so checkpoints, are
    unchanged. Blocks, not the whole model: the sampler's data-dependent top-k and the token gathers would break
    one big graph, and all blocks of one width share a compiled graph. Returns how many blocks were compiled.

    Inductor's own random numbers would give dropout (the sampler's) other masks than eager mode: with
    ``fallback_random`` a compiled run draws exactly what the eager run draws, so seeds, exact resume and
    the eager/compiled comparison keep holding."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    count = 0
    for block in blocks:
        block.forward = torch.compile(block.forward)
        count += 1
    return count


def build_module(builder: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """Construct the model. Under ZeRO-3 it is built inside ``deepspeed.zero.Init``: each parameter is
    sharded as soon as its module exists, so no rank ever holds the whole model (ViT-H/g on many ranks)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return builder()
    select_accelerator()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return builder()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], ds_config: dict[str, Any]) -> None:
    """Copy ``state`` (a subset of the module's parameters, by name) into ``model`` before the engine exists.
    Under ZeRO-3 each parameter is gathered, written by rank 0 and re-partitioned (every rank must call)."""
    params = dict(model.named_parameters())
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        return
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, tensor in state.items():
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0), torch.no_grad():
            if rank == 0:
                params[name].copy_(tensor)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` with the client optimizer; returns the engine."""
    select_accelerator()
    import deepspeed
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    # ZeRO accepts only the exact optimizer classes it lists; ours add a non-finite check to AdamW / CPU Adam.
    cls = type(optimizer)
    if cls not in ZERO_SUPPORTED_OPTIMIZERS and any(issubclass(cls, known) for known in ZERO_SUPPORTED_OPTIMIZERS):
        ZERO_SUPPORTED_OPTIMIZERS.append(cls)

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=True)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into buckets, "all-reduce" them
        # alone, divide by 1 and copy them back each step (ViT-L: 1.3 GB of copies, a third of a CPU step).
        engine.enable_backward_allreduce = False
    return engine


def shutdown() -> None:
    """Destroy the process group (an exit with it alive occasionally aborts the process). Engines and their
    wrappers (DDP, fairscale's ShardedDDP, DeepSpeed) keep references to it: the caller drops them and they are
    collected here first, so the group's gloo threads end now rather than during interpreter teardown, where a
    2-rank run's rank 1 sometimes aborted after finishing ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist  # DeepSpeed's process group is torch's

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
