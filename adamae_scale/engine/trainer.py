"""The training loop. It knows an engine, a loss function and an iterator of tensor dicts: no video.

One ``step`` is one optimizer step = ``accumulation`` micro-batches on every rank, i.e.
``global_batch = micro_batch_size × accumulation × world_size`` samples.
"""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from tqdm import tqdm

from ..metrics import MetricsLogger
from .checkpoint import Checkpointer, CheckpointRef
from .optim import set_lr

LossFn = Callable[[Callable[..., Any], Mapping[str, torch.Tensor]], Mapping[str, Any]]
# Called on every rank after each optimizer step (after logging, before checkpointing) with the trainer and
# whether this is the last step of fit(): periodic evaluation, TensorBoard images. Collective calls are allowed.
StepHook = Callable[["Trainer", bool], None]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The RNG seed of one micro-batch: dropout and mask sampling replay exactly after a resume."""
    return (seed * 1_000_003 + step * 1_009 + micro * 101 + rank * 7_919) % (2**63)


class Trainer:
    def __init__(
        self,
        engine: Any,
        loss_fn: LossFn,
        data: Iterator[dict[str, torch.Tensor]],
        checkpointer: Checkpointer,
        logger: MetricsLogger,
        lr_schedule: Callable[[int], dict[str, float]],
        steps: int,
        global_batch: int,
        seed: int = 0,
        log_every: int = 1,
        progress: bool = True,
        hooks: Sequence[StepHook] = (),
    ):
        self.engine, self.loss_fn, self.data = engine, loss_fn, data
        self.checkpointer, self.logger = checkpointer, logger
        self.lr_schedule, self.steps, self.global_batch = lr_schedule, steps, global_batch
        self.seed, self.log_every = seed, log_every
        self.hooks = list(hooks)
        self.rank = engine.global_rank
        self.world_size = engine.world_size
        self.accumulation = engine.gradient_accumulation_steps()
        self.progress = progress and self.rank == 0
        self.step = 0
        self.stopped_by_signal = 0  # the signal number that ended fit() early, if any
        self._pending_signal = 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])

    def resume(self, ref: CheckpointRef | None) -> None:
        """Continue from checkpoint ``ref`` (a ``CheckpointRef``; ``None`` starts fresh)."""
        if ref is not None:
            self.load_state_dict(self.checkpointer.load(self.engine, ref))

    # -- loop --------------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.engine.device
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def sample_positions(self, micro: int) -> torch.Tensor:
        """Positions in the global sample stream of this rank's micro-batch: identical for a sample
        whatever the world size or accumulation, so per-sample randomness can be keyed on it."""
        batch = self.engine.train_micro_batch_size_per_gpu()
        first = ((self.step * self.accumulation + micro) * self.world_size + self.rank) * batch
        return torch.arange(first, first + batch)

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the micro-batch mean of every scalar the loss function reported."""
        set_lr(self.engine.optimizer, self.lr_schedule(self.step))
        totals: dict[str, float] = {}
        for micro in range(self.accumulation):
            torch.manual_seed(step_seed(self.seed, self.step, micro, self.rank))
            batch = dict(next(self.data))
            batch["sample_position"] = self.sample_positions(micro)
            batch = self._to_device(batch)
            outputs = self.loss_fn(self.engine, batch)
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: stopping before it spreads")
            self.engine.backward(loss)
            self.engine.step()
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    continue
                value = value.detach() if torch.is_tensor(value) else value
                totals[key] = totals.get(key, 0.0) + float(value) / self.accumulation
        return totals

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        sums = self._all_ranks([values[k] for k in keys], "sum")
        return {k: v / self.world_size for k, v in zip(keys, sums, strict=True)}

    def _all_ranks_max(self, values: list[float]) -> list[float]:
        return self._all_ranks(values, "max")

    def _all_ranks(self, values: list[float], op: str) -> list[float]:
        """All-reduce a few scalars (``op``: ``sum`` or ``max``) over the ranks."""
        if self.world_size == 1 or not values:
            return values
        import deepspeed.comm as dist

        packed = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return packed.tolist()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending_signal = signum

    def _signal_received(self) -> int:
        """The pending SIGTERM/SIGINT of any rank, agreed by all ranks so they stop at the same step."""
        return int(self._all_ranks_max([float(self._pending_signal)])[0])

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train until ``steps`` (or ``stop_after`` steps of the schedule); log, checkpoint; return the
        last logged metrics."""
        end = self.steps if stop_after is None else min(self.steps, stop_after)
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, desc="pretrain", unit="step")
        last: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        # Pre-emption (SIGTERM from SLURM/Kubernetes, Ctrl-C): finish the step, checkpoint, stop.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.step < end:
                values = self.train_step()
                self.step += 1
                window_steps += 1
                self.stopped_by_signal = self._signal_received()
                last_step = self.step == end or bool(self.stopped_by_signal)
                if self.step % self.log_every == 0 or last_step:
                    elapsed = time.perf_counter() - window_start
                    values = self._mean_over_ranks(values)
                    values["lr"] = self.lr_schedule(self.step - 1)["cosine"]
                    values["clips_per_s"] = window_steps * self.global_batch / max(elapsed, 1e-9)
                    values["mem_peak_bytes"] = self._all_ranks_max([float(peak_memory_bytes(self.engine.device))])[0]
                    if hasattr(self.data, "metrics"):  # e.g. samples skipped as corrupt
                        values.update(self.data.metrics())
                    self.logger.log(self.step, values)
                    last = values
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    window_start, window_steps = time.perf_counter(), 0
                for hook in self.hooks:
                    hook(self, last_step)
                if self.checkpointer.should_save(self.step, last_step):
                    self.checkpointer.save(self.engine, self.step, self.state_dict())
                bar.update(1)
                if self.stopped_by_signal:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        return last


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated accelerator memory, or resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
