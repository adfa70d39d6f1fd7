"""TensorBoard pictures during pre-training: the ``adamae_scale.visual.panel`` picture of one fixed held-out clip.

Every ``train.image_every`` steps (0: a quarter of the run's steps, so about 4 pictures) and at the end of
each invocation, under the tag ``panel``, with the clip's focus figures (``adamae_scale.visual.focus``) as scalars
``panel/top_moving_prob_share``, ``panel/top_moving_visible_share`` and, on synthetic data, the same for
``ground_truth``. The clip: for synthetic data the first held-out clip of ``data.eval_seed`` with its
ground-truth motion tokens outlined; for shards the first readable clip of the shards in their stored
order, with the evaluation window and crop.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import DataSection, SyntheticData, synthetic_config
from ..data.synthetic import render_clip
from ..engine.interface import TrainingEngine
from ..engine.trainer import StepHook, Trainer
from ..metrics import MetricsLogger
from ..models.adamae import AdaMAEConfig
from .focus import clip_focus
from .panel import Panel, compute_panel

if TYPE_CHECKING:
    from ..config import PretrainConfig

TAG = "panel"
AUTO_IMAGES = 4


def image_interval(setting: int | None, steps: int) -> int | None:
    """``train.image_every``: N, ``0`` = auto (``steps / AUTO_IMAGES``, rounded up), ``None`` = off."""
    if setting is None:
        return None
    return setting or max(1, math.ceil(steps / AUTO_IMAGES))


def held_out_clip(
    data: DataSection, model_cfg: AdaMAEConfig, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(clip [3, T, H, W] uint8, ground-truth motion [N] or None)``, the same on every rank; None when the
    shards hold no readable clip. ``index``: which held-out synthetic clip."""
    if isinstance(data, SyntheticData):
        video, motion = render_clip(synthetic_config(replace(data, seed=data.eval_seed), model_cfg), index)
        return (video * 255.0).round().to(torch.uint8), motion
    from ..data.eval_clips import shard_clips

    rate = data.sampling_rate
    first = list(islice(shard_clips(data.urls, model_cfg.num_frames, model_cfg.img_size, rate), 1))
    return (first[0][1], None) if first else None


@dataclass
class PanelHook:
    """A ``StepHook``: every rank runs the forward pass (ZeRO-3 gathers each layer's weights from all ranks),
    rank 0 draws and writes the picture."""

    model_cfg: AdaMAEConfig
    clip: torch.Tensor
    motion: torch.Tensor | None
    every: int
    target: str
    seed: int

    def __call__(self, trainer: Trainer, last_step: bool) -> None:
        if not last_step and trainer.step % self.every:
            return
        engine = trainer.engine
        engine.eval()
        try:
            panel = compute_panel(
                engine, self.model_cfg, self.clip, "topk", self.seed, 0, self.target, engine.device, self.motion
            )
        finally:
            engine.train()
        if trainer.rank == 0:
            self._log_focus(trainer.logger, trainer.step, panel)
            trainer.logger.log_image(TAG, trainer.step, panel.image())

    def _log_focus(self, logger: MetricsLogger, step: int, panel: Panel) -> None:
        if logger.writer is None:
            return
        cfg = self.model_cfg
        report = clip_focus(panel.frames, panel.mask, panel.probs, cfg.tubelet_size, cfg.patch_size, panel.motion)
        for group in ("top_moving", "ground_truth"):
            for key in ("prob_share", "visible_share"):
                value = (report.get(group) or {}).get(key)
                if value is not None:
                    logger.writer.add_scalar(f"{TAG}/{group}_{key}", value, step)


def panel_hooks(cfg: PretrainConfig, model_cfg: AdaMAEConfig) -> list[StepHook]:
    """The picture hook of a run (empty when ``train.image_every`` is null or no clip can be read)."""
    every = image_interval(cfg.train.image_every, cfg.train.steps)
    if every is None:
        return []
    found = held_out_clip(cfg.data, model_cfg)
    if found is None:
        print("[adamae] no readable clip in the shards: no TensorBoard pictures", file=sys.stderr)
        return []
    clip, motion = found
    return [PanelHook(model_cfg, clip, motion, every, cfg.loss.target, cfg.run.seed)]


@torch.no_grad()
def write_pictures(
    engine: TrainingEngine, cfg: PretrainConfig, model_cfg: AdaMAEConfig, out_dir: Path, count: int, rank: int
) -> list[Path]:
    """The ``adamae-visualize`` picture (PNG, GIF, JSON) of the first ``count`` held-out synthetic clips, ground
    truth outlined, into ``out_dir``; every rank runs the forward passes, rank 0 writes. Returns the PNGs."""
    from .cli import write_outputs

    written = []
    engine.eval()
    try:
        for index in range(count):
            found = held_out_clip(cfg.data, model_cfg, index)
            if found is None:
                break
            clip, motion = found
            panel = compute_panel(
                engine, model_cfg, clip, "topk", cfg.run.seed, index, cfg.loss.target, engine.device, motion
            )
            if rank == 0:
                focus = clip_focus(
                    panel.frames, panel.mask, panel.probs, model_cfg.tubelet_size, model_cfg.patch_size, panel.motion
                )
                out_dir.mkdir(parents=True, exist_ok=True)
                record = {"clip": f"held-out synthetic clip {index}", "rows": panel.row_names, "focus": focus}
                write_outputs(out_dir, f"clip-{index}", panel, record)
                written.append(out_dir / f"clip-{index}.png")
    finally:
        engine.train()
    return written


__all__ = ["TAG", "PanelHook", "held_out_clip", "image_interval", "panel_hooks", "write_pictures"]
