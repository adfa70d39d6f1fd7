"""``engine=fairscale``: fairscale's sharding behind the interface the trainer already uses from DeepSpeed.

``FairscaleEngine`` has exactly the members the trainer, the checkpointer, the objective and the benchmark
use from a DeepSpeed engine (``__call__``, ``module``, ``optimizer``, ``device``, ranks, ``backward``,
``step``, ``get_global_grad_norm``, ``save_checkpoint``, ``load_checkpoint``, ``train``/``eval``), so they
need no branch on the engine. ``engine.sharding`` picks the stage:

- ``oss``: ``fairscale.optim.OSS`` shards the AdamW state; gradients are all-reduced by torch's DDP (≈ ZeRO-1);
- ``oss_sdp``: OSS + ``ShardedDataParallel``, which reduces each gradient to the rank owning it (≈ ZeRO-2);
- ``fsdp``: ``FullyShardedDataParallel`` shards the parameters too (≈ ZeRO-3). CUDA only: fairscale's FSDP
  does not run on the CPU (``schema`` refuses it there).

Numerics follow DeepSpeed's ``torch_autocast`` mode: fp32 weights, the model's forward under bf16 autocast
(the sampler switches it off for itself), ``loss / accumulation`` before backward, the gradient norm over all
ranks clipped at the accumulation boundary, then the optimizer step. The optimizer is the project's
``GuardedAdamW`` (wrapped in OSS), so the non-finite guard works unchanged.

Checkpoints (one tag folder, written inside ``Checkpointer.save``, which adds ``config.json``, the manifest
and the ``latest`` pointer): ``model.safetensors`` (the full fp32 weights, rank 0), ``client_state.json``
(step, data position; rank 0), ``fairscale.json`` (this format's description) and one
``optim_rank_NNNNN.pt`` per rank: that rank's own AdamW state plus the global index of each of its
parameters, so no rank ever gathers the whole optimizer state. Resuming reads every rank's file
(memory-mapped, ``weights_only``) and keeps its own parameters' state, whatever the new world size
(OSS re-partitions), so elastic resume works for ``oss``/``oss_sdp``; ``fsdp`` resumes on the same world
size only. Nothing is un-pickled beyond tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import setup
from .checkpoint import NoUsableCheckpoint, atomic_write_text
from .collectives import barrier

SHARDINGS = ("oss", "oss_sdp", "fsdp")
DEFAULT_SHARDING = "oss_sdp"
CHECKPOINT_FORMAT = "adamae-fairscale-checkpoint-v1"
META_FILE = "fairscale.json"
MODEL_FILE = "model.safetensors"
CLIENT_STATE_FILE = "client_state.json"
OPTIM_FILE = "optim_rank_{:05d}.pt"


def is_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a checkpoint tag folder written by this engine."""
    return (Path(folder) / META_FILE).is_file()


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``fairscale.json`` of a checkpoint tag folder."""
    meta = json.loads((Path(folder) / META_FILE).read_text())
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{Path(folder) / META_FILE}: not a {CHECKPOINT_FORMAT} description")
    return meta


def device_type() -> str:
    """``cuda`` or ``cpu``: the accelerator the run trains on, chosen as for DeepSpeed (``setup.accelerator``)."""
    return "cuda" if setup.accelerator() == "cuda" else "cpu"


@dataclass(frozen=True)
class FairscaleSettings:
    """What the engine needs of a run: the stage (``engine.sharding``) and the batch, clipping and precision
    that DeepSpeed applies from its JSON (here from the run's typed config, ``engines.EngineSpec``)."""

    sharding: str
    micro_batch_size: int
    accumulation: int
    clip_grad: float
    bf16: bool


# -- activation checkpointing ------------------------------------------------------------------------------
def checkpoint_blocks(blocks: Iterable[nn.Module], every: int, offload_to_cpu: bool = False) -> int:
    """``fairscale.nn.checkpoint.checkpoint_wrapper`` on every ``every``-th block; returns how many.

    fairscale recomputes a block in backward under CUDA fp16 autocast if any autocast was on in forward, and
    under none on the CPU (it records one bool), so a bf16 block would be recomputed in another precision.
    The wrapped block therefore receives the autocast state of its forward as an argument, which fairscale
    replays with the inputs, and re-enters it. Parameter names are unchanged (the block keeps its place).

    The recomputation is a backward inside backward. ShardedDataParallel queues its end-of-backward gradient
    flush from the first gradient hook that fires; AdaMAE's decoder head and the sampler are never wrapped,
    so that hook fires in the outer backward and the flush waits for every block's gradients.
    """
    chosen = setup.checkpointed_blocks(blocks, every)
    if not chosen:
        return 0
    from fairscale.nn.checkpoint import checkpoint_wrapper

    for block in chosen:
        # fairscale wraps the class's forward; one set on the instance (``setup.compile_blocks``) is kept inside.
        object.__setattr__(block, "_inner_forward", block.__dict__.get("forward"))
        block.__class__ = _autocast_replaying(type(block))
        checkpoint_wrapper(block, offload_to_cpu=offload_to_cpu)
        block.forward = functools.partial(_with_autocast_state, block.forward)
    return len(chosen)


def _with_autocast_state(checkpointed: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
    state = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return checkpointed(*args, _autocast=state, **kwargs)


_REPLAYING: dict[type[nn.Module], type[nn.Module]] = {}


def _autocast_replaying(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose ``forward`` runs under the autocast state it is given (one per class)."""
    if cls not in _REPLAYING:

        def forward(self: nn.Module, *args: Any, _autocast: tuple[str, bool, torch.dtype], **kwargs: Any) -> Any:
            device, enabled, dtype = _autocast
            inner = self.__dict__.get("_inner_forward")
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                return inner(*args, **kwargs) if inner is not None else cls.forward(self, *args, **kwargs)

        _REPLAYING[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return _REPLAYING[cls]


# -- the engine ----------------------------------------------------------------------------------------------
class FairscaleEngine:
    """A model, its ``GuardedAdamW`` and the fairscale wrappers of ``settings.sharding``; see the module doc.

    ``model`` must already be on this rank's device and ``optimizer`` built over its parameters
    (``optim.build_adamw``); the process group must exist.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: FairscaleSettings):
        if settings.sharding not in SHARDINGS:
            raise ValueError(f"engine.sharding={settings.sharding!r}: expected one of {SHARDINGS}")
        self.settings = settings
        self.module = model
        self.device = next(model.parameters()).device
        self.global_rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.global_steps = 0
        self.micro_steps = 0
        self._grad_norm: float | None = None
        if settings.sharding == "fsdp":
            self._wrap_fsdp(model, optimizer)
        else:
            self._wrap_oss(model, optimizer)

    def _wrap_oss(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        # OSS builds one optimizer of the same class per rank over that rank's share of each param group; the
        # groups already carry every hyper-parameter, the constructor takes the defaults it knows.
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        with _quiet_root_logger():
            self.optimizer: Any = OSS([dict(g) for g in optimizer.param_groups], optim=type(optimizer), **defaults)
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(flat)}
        partition = self.optimizer.partition_parameters()[self.global_rank]
        # The global index of each parameter of this rank's optimizer, in its state_dict's order.
        self._local_index = [index[id(p)] for group in partition for p in group["params"]]
        if self.settings.sharding == "oss_sdp":
            with _quiet_root_logger():
                self._wrapped: nn.Module = ShardedDataParallel(model, self.optimizer, broadcast_buffers=False)
        else:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        self._eval_module = model  # no gradient bookkeeping outside training

    def _wrap_fsdp(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.device.type != "cuda":
            raise ValueError("engine.sharding=fsdp: fairscale's FullyShardedDataParallel needs CUDA")
        from fairscale.nn.data_parallel import FullyShardedDataParallel

        # Unflattened, FSDP shards each parameter in place, so the optimizer built over the model's parameters
        # (weight-decay groups by name) keeps working on the shards.
        self._wrapped = FullyShardedDataParallel(
            model, flatten_parameters=False, mixed_precision=False, state_dict_on_rank_0_only=True
        )
        self.optimizer = optimizer
        self._local_index = list(range(sum(len(g["params"]) for g in optimizer.param_groups)))
        self._eval_module = self._wrapped  # the module alone holds only shards

    # -- what the trainer calls ----------------------------------------------------------------------------
    def gradient_accumulation_steps(self) -> int:
        return self.settings.accumulation

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.settings.micro_batch_size

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.settings.accumulation == 0

    def train(self, mode: bool = True) -> FairscaleEngine:
        self._wrapped.train(mode)
        return self

    def eval(self) -> FairscaleEngine:
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.settings.bf16 else contextlib.nullcontext()
        )
        if not self._wrapped.training:
            with autocast:
                return self._eval_module(*args, **kwargs)
        with autocast, self._no_sync_unless_boundary():
            return self._wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if self.settings.accumulation > 1:
            loss = loss / self.settings.accumulation
        with self._no_sync_unless_boundary():
            loss.backward()

    def step(self) -> None:
        """The end of a micro-batch; at the accumulation boundary: clip, optimizer step, zero the gradients."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        # Always measured (DeepSpeed reports it too); an infinite bound leaves the gradients alone.
        max_norm = self.settings.clip_grad if self.settings.clip_grad > 0 else math.inf
        if self.settings.sharding == "fsdp":
            norm = self._wrapped.clip_grad_norm_(max_norm)  # type: ignore[operator]
        else:
            norm = self.optimizer.clip_grad_norm(max_norm)
        self._grad_norm = float(norm)
        self.optimizer.step()  # the guard inside refuses a non-finite step on every rank
        self._wrapped.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        """The gradient norm over all ranks before clipping, at the last optimizer step."""
        return self._grad_norm

    @contextlib.contextmanager
    def _no_sync_unless_boundary(self) -> Iterator[None]:
        # Gradients of the micro-batches before the boundary accumulate locally; the boundary's backward reduces.
        if self.world_size > 1 and not self.is_gradient_accumulation_boundary():
            with self._wrapped.no_sync():  # type: ignore[operator]
                yield
        else:
            yield

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str,
        client_state: Mapping[str, Any] | None = None,
        save_latest: bool = True,
    ) -> bool:
        """Write this rank's files into ``save_dir/tag`` (see the module doc); every rank must call this."""
        from ..convert.io import write_safetensors

        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        weights = self._full_model_state()  # collective under FSDP
        torch.save(
            {"optimizer": self.optimizer_shard(), "global_index": self._local_index, "rank": self.global_rank},
            folder / OPTIM_FILE.format(self.global_rank),
        )
        if self.global_rank == 0:
            write_safetensors(folder / MODEL_FILE, weights, metadata={"format": "pt"})  # one tensor at a time
            atomic_write_text(folder / CLIENT_STATE_FILE, json.dumps(dict(client_state or {}), indent=1))
            meta = {
                "format": CHECKPOINT_FORMAT,
                "engine": "fairscale",
                "sharding": self.settings.sharding,
                "world_size": self.world_size,
                "global_steps": self.global_steps,
                "model_file": MODEL_FILE,
                "optimizer_files": [OPTIM_FILE.format(r) for r in range(self.world_size)],
            }
            atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        barrier()
        if save_latest and self.global_rank == 0:
            atomic_write_text(Path(save_dir) / "latest", tag)
        barrier()
        return True

    def optimizer_shard(self) -> dict[str, Any]:
        """This rank's optimizer state_dict (OSS: the local AdamW over its partition; FSDP: over its shards)."""
        local = self.optimizer if self.settings.sharding == "fsdp" else self.optimizer.optim
        return local.state_dict()

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        if self.settings.sharding == "fsdp":
            return dict(self._wrapped.state_dict())  # full weights, gathered to rank 0
        return dict(self.module.state_dict())

    def load_checkpoint(self, load_dir: str | os.PathLike[str], tag: str) -> tuple[str, dict[str, Any]]:
        """Load ``load_dir/tag`` into the model and the optimizer; returns the path and the client state."""
        from safetensors.torch import load_file

        folder = Path(load_dir) / tag
        if not is_checkpoint(folder):
            raise NoUsableCheckpoint(
                f"train.resume: {folder} was not written by engine=fairscale (no {META_FILE}); resume it with the "
                "engine that wrote it, or start over with train.resume=none"
            )
        meta = read_meta(folder)
        saved = meta["sharding"]
        if (saved == "fsdp") != (self.settings.sharding == "fsdp"):
            raise NoUsableCheckpoint(
                f"train.resume: {folder} was written with engine.sharding={saved}; its optimizer state does not load "
                f"into engine.sharding={self.settings.sharding}"
            )
        if saved == "fsdp" and meta["world_size"] != self.world_size:
            raise NoUsableCheckpoint(
                f"train.resume: {folder} was written by {meta['world_size']} ranks with engine.sharding=fsdp, which "
                f"resumes on the same number of ranks only (this run has {self.world_size})"
            )
        weights = load_file(str(folder / meta["model_file"]))
        if self.settings.sharding == "fsdp":
            self._wrapped.load_state_dict(weights)
            shard = _load_shard(folder / meta["optimizer_files"][self.global_rank])
            self.optimizer.load_state_dict(shard["optimizer"])
        else:
            with torch.no_grad():
                self.module.load_state_dict(weights)
            self._load_oss_state([folder / name for name in meta["optimizer_files"]])
        self.global_steps = int(meta["global_steps"])
        client_state = json.loads((folder / CLIENT_STATE_FILE).read_text())
        barrier()
        return str(folder), client_state

    def _load_oss_state(self, files: list[Path]) -> None:
        """Assemble the global optimizer state OSS expects from every saved rank's file, keeping (and copying
        out of the memory-mapped file) only the entries of this rank's parameters."""
        owned = set(self._local_index)
        state: dict[int, dict[str, Any]] = {}
        saved_groups: list[dict[str, Any]] | None = None
        for path in files:
            shard = _load_shard(path)
            for local, values in shard["optimizer"]["state"].items():
                index = shard["global_index"][local]
                if index in owned:
                    state[index] = {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}
            if saved_groups is None:
                saved_groups = shard["optimizer"]["param_groups"]
        assert saved_groups is not None
        groups, start = [], 0
        # The saved hyper-parameters per group (every rank's optimizer has all groups), numbered as OSS's groups.
        for saved, current in zip(saved_groups, self.optimizer.param_groups, strict=True):
            count = len(current["params"])
            groups.append({**saved, "params": list(range(start, start + count))})
            start += count
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """fairscale logs its bucket sizes at INFO on the root logger, which Hydra prints: not news for a user."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _load_shard(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def rank_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) or the CPU."""
    if device_type() != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device
