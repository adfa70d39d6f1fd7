"""Which engine trains the model: the one place that maps ``engine=deepspeed|fairscale`` to code.

An engine differs from the other in five steps only: how the model is constructed (ZeRO-3 shards it at
birth) and given its initial weights, whether AdamW runs on the host (ZeRO offload), how activation
checkpointing wraps the blocks, and how the engine object is made; plus how a checkpoint written on another
world size is resumed. The run builder goes through ``backend(spec, world_size)``; the trainer, the
checkpointer and the objective only see the engine's duck-typed interface (forward, backward, step,
save/load, ranks), which both engines have. The DeepSpeed JSON exists only inside ``DeepSpeedBackend``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import fairscale_engine, setup
from .checkpoint import CheckpointRef, NoUsableCheckpoint, to_universal
from .interface import TrainingEngine

DEFAULT = "deepspeed"


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs of a run: which engine (``engine.name``, ``engine.sharding`` for fairscale), the
    DeepSpeed stage (``ds``, a shipped name or a JSON path, ``auto`` resolved) and the batch, clipping and
    precision both engines apply the same way."""

    micro_batch_size: int
    accumulation: int = 1
    clip_grad: float = 0.0
    precision: str = "fp32"
    name: str = DEFAULT
    ds: str = "zero0"
    sharding: str = fairscale_engine.DEFAULT_SHARDING


class Backend(Protocol):
    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module: ...
    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None: ...
    def offloads_optimizer(self) -> bool: ...
    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int: ...
    def initialize(self, model: nn.Module, optimizer: Any) -> TrainingEngine: ...
    def resume_from(self, ref: CheckpointRef, world_size: int, is_rank0: bool) -> CheckpointRef: ...


@dataclass
class DeepSpeedBackend:
    spec: EngineSpec
    world_size: int = 1
    ds_config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.ds_config = setup.build_ds_config(
            setup.load_ds_config(spec.ds),
            spec.micro_batch_size,
            spec.accumulation,
            self.world_size,
            spec.precision,
            spec.clip_grad,
        )

    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module:
        setup.tune_host_allocator(partitions_weights=self.ds_config.get("zero_optimization", {}).get("stage") == 3)
        return setup.build_module(builder, self.ds_config)

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        setup.load_weights(model, state, self.ds_config)

    def offloads_optimizer(self) -> bool:
        return setup.offloads_optimizer(self.ds_config)

    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int:
        return setup.apply_activation_checkpointing(blocks, every)

    def initialize(self, model: nn.Module, optimizer: Any) -> TrainingEngine:
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
    spec: EngineSpec
    world_size: int = 1

    def build_module(self, builder: Callable[[], nn.Module]) -> nn.Module:
        setup.tune_host_allocator(partitions_weights=self.spec.sharding == "fsdp")
        return builder().to(fairscale_engine.rank_device())

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def offloads_optimizer(self) -> bool:
        return False

    def checkpoint_activations(self, blocks: Iterable[nn.Module], every: int, offload: bool) -> int:
        return fairscale_engine.checkpoint_blocks(blocks, every, offload_to_cpu=offload)

    def initialize(self, model: nn.Module, optimizer: Any) -> TrainingEngine:
        spec = self.spec
        settings = fairscale_engine.FairscaleSettings(
            spec.sharding, spec.micro_batch_size, spec.accumulation, float(spec.clip_grad), spec.precision == "bf16"
        )
        return fairscale_engine.FairscaleEngine(model, optimizer, settings)

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


_BACKENDS: dict[str, Callable[[EngineSpec, int], Backend]] = {
    "deepspeed": DeepSpeedBackend,
    "fairscale": FairscaleBackend,
}
ENGINES = tuple(_BACKENDS)


def backend(spec: EngineSpec, world_size: int = 1) -> Backend:
    """The backend of ``spec.name`` for a run of ``world_size`` ranks."""
    if spec.name not in _BACKENDS:
        raise ValueError(f"engine={spec.name!r}: expected one of {ENGINES}")
    return _BACKENDS[spec.name](spec, world_size)
