"""Which engine trains the model: the one place that maps ``engine=deepspeed|fairscale`` to code.

An engine differs from the other in four steps only: how the model is constructed (ZeRO-3 shards it at
birth), whether AdamW runs on the host (ZeRO offload), how activation checkpointing wraps the blocks, and
how the engine object is made; plus how a checkpoint written on another world size is resumed.
``pretrain.build_engine`` and ``pretrain.engine_config`` go through ``backend(cfg, ds_config)``; the
trainer, the checkpointer and the objective only see the engine's duck-typed interface (forward,
backward, step, save/load, ranks), which both engines have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from . import fairscale_engine, setup
from .checkpoint import CheckpointRef, NoUsableCheckpoint, to_universal

DEFAULT = "deepspeed"


def engine_name(cfg: Mapping[str, Any]) -> str:
    """``engine.name`` of a run config (configs without an ``engine`` section, e.g. fine-tuning's: DeepSpeed)."""
    engine = cfg.get("engine") or {}
    return str(engine.get("name", DEFAULT)) if isinstance(engine, Mapping) else str(engine)


class Backend(Protocol):
    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module: ...
    def offloads_optimizer(self) -> bool: ...
    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int: ...
    def initialize(self, model: nn.Module, optimizer: Any) -> Any: ...
    def resume_from(self, ref: CheckpointRef, world_size: int, is_rank0: bool) -> CheckpointRef: ...


@dataclass
class DeepSpeedBackend:
    ds_config: dict[str, Any]

    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module:
        setup.tune_host_allocator(partitions_weights=self.ds_config.get("zero_optimization", {}).get("stage") == 3)
        return setup.build_module(builder, self.ds_config)

    def offloads_optimizer(self) -> bool:
        return setup.offloads_optimizer(self.ds_config)

    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int:
        return setup.apply_activation_checkpointing(blocks, every)

    def initialize(self, model: nn.Module, optimizer: Any) -> Any:
        return setup.initialize(model, optimizer, self.ds_config)

    def resume_from(self, ref: CheckpointRef, world_size: int, is_rank0: bool) -> CheckpointRef:
        _refuse_foreign(ref, "deepspeed")
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if ref.world_size in (None, world_size) or stage == 0:
            # ZeRO-0 checkpoints hold whole states, the same file for any world size: they load as they are.
            return ref
        # Elastic resume: re-shard through DeepSpeed's world-size independent universal format.
        self.ds_config["checkpoint"] = {"load_universal": True}
        return to_universal(ref, is_rank0=is_rank0)


@dataclass
class FairscaleBackend:
    cfg: Mapping[str, Any]
    ds_config: dict[str, Any]  # read for batch, accumulation, clipping and precision only

    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module:
        setup.tune_host_allocator(partitions_weights=self.cfg["engine"].get("sharding") == "fsdp")
        return builder().to(fairscale_engine.rank_device())

    def offloads_optimizer(self) -> bool:
        return False

    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int:
        return fairscale_engine.checkpoint_blocks(blocks, every, offload_to_cpu=offload)

    def initialize(self, model: nn.Module, optimizer: Any) -> Any:
        return fairscale_engine.build(model, optimizer, self.cfg, self.ds_config)

    def resume_from(self, ref: CheckpointRef, world_size: int, is_rank0: bool) -> CheckpointRef:
        # Another world size needs nothing here: OSS re-partitions the saved state (FSDP refuses it on load).
        _refuse_foreign(ref, "fairscale")
        return ref


def is_checkpoint_folder(folder: Path) -> bool:
    """A checkpoint tag folder of either engine: DeepSpeed's (``*model_states.pt``) or fairscale's."""
    return folder.is_dir() and (any(folder.glob("*model_states.pt")) or fairscale_engine.is_checkpoint(folder))


def written_by(folder: Any) -> str:
    """The engine that wrote a checkpoint tag folder."""
    return "fairscale" if fairscale_engine.is_checkpoint(folder) else "deepspeed"


def _refuse_foreign(ref: CheckpointRef, engine: str) -> None:
    other = written_by(ref.path)
    if other != engine:
        raise NoUsableCheckpoint(
            f"train.resume: {ref.path} was written by engine={other}; resume it with engine={other}, "
            "or start over with train.resume=none"
        )


_BACKENDS: dict[str, Callable[[Mapping[str, Any], dict[str, Any]], Backend]] = {
    "deepspeed": lambda cfg, ds_config: DeepSpeedBackend(ds_config),
    "fairscale": FairscaleBackend,
}
ENGINES = tuple(_BACKENDS)


def backend(cfg: Mapping[str, Any], ds_config: dict[str, Any]) -> Backend:
    """The backend of ``cfg``'s engine; ``ds_config`` is the run's engine config (``setup.build_ds_config``)."""
    name = engine_name(cfg)
    if name not in _BACKENDS:
        raise ValueError(f"engine={name!r}: expected one of {ENGINES}")
    return _BACKENDS[name](cfg, ds_config)
