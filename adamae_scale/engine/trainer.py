"""The training loop. It knows an engine, a loss function and an iterator of tensor dicts: no video.

One ``step`` is one optimizer step = ``accumulation`` micro-batches on every rank, i.e.
``global_batch = micro_batch_size × accumulation × world_size`` samples.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from tqdm import tqdm

from ..base.collectives import all_reduce, barrier
from ..base.seeds import TORCH_SEED_RANGE, derive_seed
from ..metrics import MetricsLogger
from .checkpoint import Checkpointer, CheckpointRef
from .guard import find_guard, weights_finite
from .interface import TrainingEngine
from .optim import Schedule

LossFn = Callable[[Callable[..., Any], Mapping[str, torch.Tensor]], Mapping[str, Any]]
# Called on every rank after each optimizer step (after logging, before checkpointing) with the trainer and
# whether this is the last step of fit(): periodic evaluation, TensorBoard images. Collective calls are allowed.
StepHook = Callable[["Trainer", bool], None]


_ENGINE_MEMBERS = sorted(
    {n for n in vars(TrainingEngine) if not n.startswith("_")} | set(TrainingEngine.__annotations__) | {"__call__"}
)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The RNG seed of one micro-batch: dropout and mask sampling replay exactly after a resume."""
    return derive_seed(seed, step * 1_009, micro * 101, rank * 7_919) % TORCH_SEED_RANGE


@dataclass(frozen=True)
class TrainPlan:
    """How long to train and when to give up: the loop's numbers, from the run's ``train`` section."""

    steps: int
    global_batch: int
    seed: int = 0
    log_every: int = 1
    max_skipped_in_a_row: int = 3  # non-finite steps in a row before the run stops (TrainingDiverged)
    loss_spike_factor: float | None = None  # a loss this many times the recent median counts as a bad step


class Trainer:
    def __init__(
        self,
        engine: TrainingEngine,
        loss_fn: LossFn,
        data: Iterator[dict[str, torch.Tensor]],
        checkpointer: Checkpointer,
        logger: MetricsLogger,
        schedule: Schedule,
        plan: TrainPlan,
        hooks: Sequence[StepHook] = (),
        progress: bool = True,
        name: str = "pretrain",
    ):
        if not isinstance(engine, TrainingEngine):  # a third engine is told what it lacks, here rather than mid-run
            missing = [name for name in _ENGINE_MEMBERS if not hasattr(engine, name)]
            raise TypeError(f"{type(engine).__name__} is not a TrainingEngine: it has no {', '.join(missing)}")
        self.engine, self.loss_fn, self.data = engine, loss_fn, data
        self.checkpointer, self.logger, self.schedule, self.plan = checkpointer, logger, schedule, plan
        self.hooks = list(hooks)
        self.name = name  # the progress bar's label
        self.guard = find_guard(engine.optimizer)
        self.skipped_steps = 0  # optimizer steps skipped for non-finite loss/gradients, this invocation included
        self.skipped_in_a_row = 0
        self._recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.rank = engine.global_rank
        self.world_size = engine.world_size
        self.accumulation = engine.gradient_accumulation_steps()
        self.progress = progress and self.rank == 0
        self.step = 0
        self.stopped_by_signal = 0  # the signal number that ended fit() early, if any
        self._pending_signal = 0
        self._save_pending = False

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Not "skipped_steps": DeepSpeed keeps its own key of that name and drops it from the client state it returns.
        state: dict[str, Any] = {"step": self.step, SKIPPED_KEY: self.skipped_steps}
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get(SKIPPED_KEY, 0))
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

    def train_step(self) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the micro-batch mean of every scalar the loss function reported, and
        whether the step was skipped (a non-finite loss or gradient on any rank: weights and optimizer state
        are left as they were)."""
        self.schedule.apply(self.engine.optimizer, self.step)
        # Scalars stay on the device until the step ends: one host sync per step, not one per value and micro-batch
        # (on a GPU each sync stalls the queue between forward and backward).
        tensor_totals: dict[str, torch.Tensor] = {}
        totals: dict[str, float] = {}
        calls_before, skipped_before = (self.guard.calls, self.guard.skipped) if self.guard is not None else (0, 0)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.engine.device)
        for micro in range(self.accumulation):
            torch.manual_seed(step_seed(self.plan.seed, self.step, micro, self.rank))
            batch = dict(next(self.data))
            batch["sample_position"] = self.sample_positions(micro)
            batch = self._to_device(batch)
            outputs = self.loss_fn(self.engine, batch)
            loss = outputs["loss"]
            nonfinite = nonfinite | ~torch.isfinite(loss.detach())
            if self.guard is None:
                if nonfinite:
                    raise FloatingPointError(f"step {self.step + 1}: the loss is {loss.item()}; stopping")
            else:
                # Read (one sync) at the boundary, where the optimizer refuses the step on every rank.
                self.guard.refuse = nonfinite
            self.engine.backward(loss)
            self.engine.step()
            for key, value in outputs.items():
                if torch.is_tensor(value):
                    if value.ndim == 0:
                        tensor_totals[key] = tensor_totals.get(key, 0.0) + value.detach().double() / self.accumulation
                else:
                    totals[key] = totals.get(key, 0.0) + float(value) / self.accumulation
        if tensor_totals:
            keys = list(tensor_totals)
            totals.update(zip(keys, torch.stack([tensor_totals[k] for k in keys]).tolist(), strict=True))
        skipped = False
        if self.guard is not None:
            self.guard.refuse = False
            # No optimizer call at all: the engine discarded the step itself (ZeRO checks the gradient norm).
            skipped = self.guard.calls == calls_before or self.guard.skipped > skipped_before
        return totals, skipped

    # -- divergence policy -------------------------------------------------------------------------
    def _after_step(self, values: dict[str, float], skipped: bool) -> str | None:
        """Count a skipped step; returns why training must stop (same answer on every rank), else None."""
        if skipped:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            self._say(
                f"[adamae] step {self.step}: non-finite loss or gradients; optimizer step skipped "
                f"({self.skipped_in_a_row} in a row, {self.skipped_steps} in all)"
            )
            if self.skipped_in_a_row >= self.plan.max_skipped_in_a_row:
                first = self.step - self.skipped_in_a_row + 1
                return (
                    f"step {self.step}: the loss or gradients were not finite for {self.skipped_in_a_row} optimizer "
                    f"steps in a row (steps {first}-{self.step}, "
                    f"train.max_skipped_in_a_row={self.plan.max_skipped_in_a_row})"
                )
            return None
        self.skipped_in_a_row = 0
        if self.plan.loss_spike_factor is None:
            return None
        loss = self._mean_over_ranks({"loss": values["loss"]})["loss"]
        if len(self._recent_losses) >= SPIKE_MIN_HISTORY:
            reference = sum(self._recent_losses) / len(self._recent_losses)
            if loss > self.plan.loss_spike_factor * reference:
                return (
                    f"step {self.step}: the loss jumped to {loss:.4g}, more than train.loss_spike_factor="
                    f"{self.plan.loss_spike_factor} times the mean of the previous {len(self._recent_losses)} steps "
                    f"({reference:.4g})"
                )
        self._recent_losses.append(loss)
        return None

    def _stop_diverged(self, reason: str, first_bad_weights: int) -> None:
        """Set aside the checkpoints holding the diverged weights (those after ``first_bad_weights`` optimizer
        steps and later), point ``latest`` at the one before, and raise ``TrainingDiverged``."""
        kept = self.checkpointer.set_aside(first_bad_weights) if self.rank == 0 else None
        barrier()
        where = f"the newest checkpoint is now {kept}" if kept else "no checkpoint from before the divergence exists"
        raise TrainingDiverged(
            f"{reason}; stopping: {where}. Lower train.base_lr, lengthen train.warmup_fraction or set "
            "train.clip_grad, then run the same command to resume."
        )

    def _say(self, line: str) -> None:
        if self.rank == 0:
            tqdm.write(line, file=sys.stderr)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        sums = self._all_ranks([values[k] for k in keys], "sum")
        return {k: v / self.world_size for k, v in zip(keys, sums, strict=True)}

    def _all_ranks_max(self, values: list[float]) -> list[float]:
        return self._all_ranks(values, "max")

    def _all_ranks(self, values: list[float], op: str) -> list[float]:
        """All-reduce a few scalars (``op``: ``sum`` or ``max``) over the ranks."""
        if self.world_size == 1:
            return values
        return all_reduce(values, op, torch.float64, self.engine.device)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending_signal = signum

    def _signal_received(self) -> int:
        """The pending SIGTERM/SIGINT of any rank, agreed by all ranks so they stop at the same step."""
        return int(self._all_ranks_max([float(self._pending_signal)])[0])

    def _grad_norm(self) -> float | None:
        norm = getattr(self.engine, "get_global_grad_norm", lambda: None)()
        if norm is None:
            return None
        return float(norm)

    def _save_checked(self, last_step: bool) -> None:
        """Checkpoint now. After a skipped step (the weights just gave a non-finite loss) a periodic save waits for
        the next good step; the run's last save (its end, a signal) is written anyway, since skipped steps leave
        the weights of the last good step, and a run must not end without a checkpoint. Weights that are not finite
        are never saved."""
        if self.skipped_in_a_row > 0 and not last_step:
            self._save_pending = True
            self._say(f"[adamae] step {self.step}: checkpoint postponed (this step was skipped)")
            return
        if self.skipped_in_a_row > 0:
            good = self.step - self.skipped_in_a_row
            self._say(
                f"[adamae] step {self.step}: the run ends after {self.skipped_in_a_row} skipped step(s): saving the "
                f"weights of step {good}, unchanged since"
            )
        if self.guard is not None and not weights_finite(self.engine.module):
            self._stop_diverged(f"step {self.step}: the weights are not finite", self.step)
        self._save_pending = False
        self.checkpointer.save(self.engine, self.step, self.state_dict())

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train until ``steps`` (or ``stop_after`` steps of the schedule); log, checkpoint; return the
        last logged metrics."""
        end = self.plan.steps if stop_after is None else min(self.plan.steps, stop_after)
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, desc=self.name, unit="step")
        last: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        # Pre-emption (SIGTERM from SLURM/Kubernetes, Ctrl-C): finish the step, checkpoint, stop.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.step < end:
                values, skipped = self.train_step()
                self.step += 1
                window_steps += 1
                stop_reason = self._after_step(values, skipped)
                self.stopped_by_signal = self._signal_received()
                last_step = self.step == end or bool(self.stopped_by_signal) or stop_reason is not None
                if self.step % self.plan.log_every == 0 or last_step:
                    elapsed = time.perf_counter() - window_start
                    values = self._mean_over_ranks(values)
                    values["lr"] = self.schedule.lr(self.step - 1)
                    values["skipped_steps"] = self.skipped_steps
                    grad_norm = self._grad_norm()
                    if grad_norm is not None:
                        values["grad_norm"] = grad_norm
                    values["clips_per_s"] = window_steps * self.plan.global_batch / max(elapsed, 1e-9)
                    values["mem_peak_bytes"] = self._all_ranks_max([float(peak_memory_bytes(self.engine.device))])[0]
                    if hasattr(self.data, "metrics"):  # e.g. samples skipped as corrupt
                        values.update(self.data.metrics())
                    self.logger.log(self.step, values)
                    last = values
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    window_start, window_steps = time.perf_counter(), 0
                if stop_reason is not None:
                    # Skipped steps leave the weights as they were after the first bad step's predecessor.
                    first_bad = self.step - self.skipped_in_a_row if skipped else self.step - 1
                    self._stop_diverged(stop_reason, first_bad)
                for hook in self.hooks:
                    hook(self, last_step)
                if self.checkpointer.should_save(self.step, last_step) or self._save_pending:
                    self._save_checked(last_step)
                bar.update(1)
                if self.stopped_by_signal:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        return last


SKIPPED_KEY = "nonfinite_steps_skipped"


class TrainingDiverged(RuntimeError):
    """Training stopped by the divergence policy (non-finite steps in a row, a loss spike)."""


# The loss-spike rule compares a step's loss with the mean of up to this many previous steps' losses,
# once at least SPIKE_MIN_HISTORY of them are known.
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated accelerator memory, or resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
