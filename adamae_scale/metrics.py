"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars.

Only rank 0 writes. ``focus_ratio`` measures whether visible tokens sit on moving regions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


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
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
