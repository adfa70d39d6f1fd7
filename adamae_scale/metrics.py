"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars.

Only rank 0 writes. ``focus_ratio`` measures whether visible tokens sit on moving regions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base.atomic import atomic_write_text


def focus_ratio(mask: torch.Tensor, motion: torch.Tensor) -> float:
    """(fraction of visible tokens that are motion tokens) / (fraction of all tokens that are).

    ``mask``: ``[B, N]`` True = masked; ``motion``: ``[B, N]`` bool. Random masking gives ~1.0.
    """
    visible = ~mask.bool()
    motion = motion.bool().to(visible.device)
    motion_share = motion.float().mean()
    if motion_share == 0:
        return float("nan")
    visible_share = (visible & motion).float().sum() / visible.float().sum()
    return float(visible_share / motion_share)


class MetricsLogger:
    """``metrics.jsonl`` + TensorBoard scalars (rank 0). ``resume_step``: the step the run continues after;
    rows logged after it by the interrupted run are dropped (the file is rewritten atomically, TensorBoard
    purges them), so every step appears once, in order. A fresh start (``0``) in a folder with an older
    ``metrics.jsonl`` moves that file to ``metrics.previous.jsonl`` first."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        if step == 0:
            os.replace(self.path, self.path.with_name("metrics.previous.jsonl"))
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(json.dumps(record))
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An ``[H, W, 3]`` uint8 picture in TensorBoard under ``tag`` (rank 0; a no-op elsewhere)."""
        if self.writer is None:
            return
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    """A JSON value: tensors as numbers, NaN/inf as null (JSON has no such numbers)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
