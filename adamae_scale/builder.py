"""The run builder shared by pre-training and fine-tuning: a typed run config → the resolved engine stage, the
process group, the checkpointer and the checkpoint to resume, the engine (model, optimizer, activation
checkpointing), the trainer, and the run's end. An entry point brings what is its own (the model, its
optimizer groups, the objective and the data) and calls these steps in order:

    run = RunBuilder.start(cfg, num_params)       # rank layout, global batch, schedule, ds=auto resolved
    run.open(metadata)                            # process group, checkpointer, backend, what to resume
    engine, model = run.build_engine(make_model, prepare, blocks, checkpoint_every)
    trainer = run.trainer(engine, objective, data)
    ... trainer.fit() ...
    run.finish(trainer, summary)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .base.atomic import atomic_write_text
from .config.compose import pinned_run_dir
from .config.run import RunSection
from .config.sections import EngineSection, TrainSection
from .engine import engines, run_lock, setup, stage
from .engine.checkpoint import Checkpointer, CheckpointRef
from .engine.engines import Backend, EngineSpec
from .engine.interface import TrainingEngine
from .engine.optim import Schedule
from .engine.trainer import LossFn, StepHook, Trainer, TrainPlan
from .metrics import MetricsLogger


def claim_run_dir(run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """What an entry point does with a checked config before Hydra writes into ``run_dir``: global rank 0 locks
    the folder for the process's lifetime (``run_lock``; ``RunDirBusy`` when another run holds it). Returns the
    overrides that make Hydra use this very folder (``config.compose.pinned_run_dir``)."""
    if setup.launch_rank() == 0:
        run_lock.hold(run_dir)
    return pinned_run_dir(overrides, run_dir)


class RunConfig(Protocol):
    """What the builder reads of ``PretrainConfig`` and ``FinetuneConfig``."""

    @property
    def train(self) -> TrainSection: ...
    @property
    def run(self) -> RunSection: ...
    @property
    def engine(self) -> EngineSection: ...
    def engine_spec(self, ds: str | None = None) -> EngineSpec: ...


@dataclass
class RunBuilder:
    cfg: RunConfig
    env: setup.DistEnv
    global_batch: int  # samples (views) per optimizer step
    schedule: Schedule
    ds: str  # the DeepSpeed stage, ``auto`` resolved
    backend: Backend | None = None
    checkpointer: Checkpointer | None = None
    resume_from: CheckpointRef | None = None

    @classmethod
    def start(cls, cfg: RunConfig, num_params: int, views_per_clip: int = 1) -> RunBuilder:
        """The rank layout, the global batch and the lr schedule (scaled by the global batch in clips: views
        divided by ``views_per_clip``), and, for DeepSpeed, the stage ``ds=auto`` picks for ``num_params``."""
        env = setup.dist_env()
        if env.rank == 0:  # already held when the command line started the run (``claim_run_dir``)
            run_lock.hold(cfg.run.run_dir)
        train = cfg.train
        global_batch = train.global_batch(env.world_size)
        ds = cfg.run.ds
        if cfg.engine.name == "deepspeed":
            checkpoints = cfg.run.run_dir / "checkpoints"
            ds = stage.resolve_for_run(ds, num_params, env.world_size, env.rank, train.resume, checkpoints)
        return cls(cfg, env, global_batch, train.schedule(global_batch // views_per_clip), ds)

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0

    def open(self, metadata: dict[str, Any], checkpoint_bytes: int = 0) -> None:
        """Start the process group; the checkpointer (``metadata`` goes into every ``config.json``); the engine
        backend; the checkpoint ``train.resume`` names (verified, written by this engine, converted to DeepSpeed's
        universal format when DeepSpeed wrote it on another world size)."""
        spec = self.cfg.engine_spec(self.ds)
        setup.init_distributed(spec.name)
        train = self.cfg.train
        metadata = {**metadata, "global_batch": self.global_batch}
        self.checkpointer = Checkpointer(
            self.cfg.run.run_dir / "checkpoints", train.ckpt_every, metadata, train.keep_last, checkpoint_bytes
        )
        resume_from = self.checkpointer.find(train.resume)
        if resume_from is not None and self.is_rank0:
            self._say_if_the_batch_changed(resume_from)
        self.backend = engines.backend(spec, self.env.world_size)
        if resume_from is not None:
            resume_from = self.backend.resume_from(resume_from, self.env.world_size, self.is_rank0)
        self.resume_from = resume_from

    def _say_if_the_batch_changed(self, ref: CheckpointRef) -> None:
        """Resuming on another world size (or micro-batch) changes the global batch, and with it the lr the
        schedule scales to: allowed, but said in one line, with how to keep the checkpoint's batch."""
        recorded = ref.recorded.get("global_batch")
        if not isinstance(recorded, int) or recorded == self.global_batch:
            return
        train, ranks = self.cfg.train, self.env.world_size
        print(
            f"[adamae] warning: train.resume={ref.path} was trained at a global batch of {recorded}; this run's is "
            f"{self.global_batch} (train.micro_batch_size={train.micro_batch_size} x train.accumulation="
            f"{train.accumulation} x {ranks} ranks), so the lr schedule now peaks at {self.schedule.peak_lr:.3g}; "
            f"to keep {recorded}, choose micro_batch_size x accumulation = {recorded / ranks:g}",
            file=sys.stderr,
            flush=True,
        )

    def build_engine(
        self,
        make_model: Callable[[], nn.Module],
        prepare: Callable[[nn.Module, Backend], torch.optim.Optimizer],
        blocks: Callable[[nn.Module], Iterable[nn.Module]],
        checkpoint_every: int,
        checkpoint_offload: bool = False,
    ) -> tuple[Any, nn.Module]:
        """The model (identical initial weights on every rank; sharded at birth under ZeRO-3) → ``prepare``
        (initial weights, optimizer groups: returns the optimizer) → activation checkpointing of ``blocks`` →
        the engine. Returns the engine and the model."""
        backend = self._opened(self.backend)
        return assemble_engine(
            backend, self.cfg.run.seed, make_model, prepare, blocks, checkpoint_every, checkpoint_offload
        )

    def trainer(
        self,
        engine: TrainingEngine,
        objective: LossFn,
        data: Any,
        hooks: Sequence[StepHook] = (),
        name: str = "pretrain",
        trainer_class: type[Trainer] = Trainer,
        **extra: Any,
    ) -> Trainer:
        """The trainer of this run, its metrics log opened and the checkpoint to resume loaded."""
        train, checkpointer = self.cfg.train, self._opened(self.checkpointer)
        resume_step = self.resume_from.step if self.resume_from is not None else 0
        trainer = trainer_class(
            engine,
            objective,
            data,
            checkpointer,
            MetricsLogger(self.cfg.run.run_dir, enabled=self.is_rank0, resume_step=resume_step),
            self.schedule,
            TrainPlan(
                steps=train.steps,
                global_batch=self.global_batch,
                seed=self.cfg.run.seed,
                log_every=train.log_every,
                max_skipped_in_a_row=train.max_skipped_in_a_row,
                loss_spike_factor=train.loss_spike_factor,
            ),
            hooks=hooks,
            name=name,
            **extra,
        )
        trainer.resume(self.resume_from)
        return trainer

    def finish(self, trainer: Trainer, summary: Mapping[str, Any]) -> None:
        """``summary.json`` (rank 0) and the metrics log closed. The caller then drops the trainer and the engine
        and calls ``setup.shutdown`` (they hold the process group)."""
        if self.is_rank0:
            atomic_write_text(self.cfg.run.run_dir / "summary.json", json.dumps(summary, indent=2))
        trainer.logger.close()

    @staticmethod
    def _opened(part: Any) -> Any:
        if part is None:
            raise RuntimeError("RunBuilder.open() must run first")
        return part


def assemble_engine(
    backend: Backend,
    seed: int,
    make_model: Callable[[], nn.Module],
    prepare: Callable[[nn.Module, Backend], torch.optim.Optimizer],
    blocks: Callable[[nn.Module], Iterable[nn.Module]],
    checkpoint_every: int,
    checkpoint_offload: bool = False,
) -> tuple[TrainingEngine, nn.Module]:
    """``RunBuilder.build_engine`` for a backend made elsewhere (the step benchmark's)."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = backend.build_module(make_model)
    optimizer = prepare(model, backend)
    backend.checkpoint_activations(blocks(model), checkpoint_every, checkpoint_offload)
    return backend.initialize(model, optimizer), model
