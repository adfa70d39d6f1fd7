"""Data sources: each yields dicts of tensors ``{"video": [B, 3, T, H, W], ...}`` and has a state.

torch is imported where a source is built, not here: the video tools (``adamae-shards`` and its worker processes)
import this package and start faster without it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .sections import SECTIONS, DataSection, ShardData, SyntheticData, check_repeated_aug, section_values

if TYPE_CHECKING:
    from ..models import AdaMAEConfig
    from .pipeline import ShardClips, ShardDataConfig
    from .synthetic import SyntheticClips, SyntheticConfig

SOURCES = tuple(SECTIONS)


def synthetic_config(section: DataSection | Mapping[str, Any], model_cfg: AdaMAEConfig) -> SyntheticConfig:
    from .synthetic import SyntheticConfig

    data = section_values(section)
    keys = (
        "num_objects",
        "object_size",
        "speed",
        "background",
        "object_texture",
        "motion_threshold",
        "seed",
        "label_task",
    )
    options: dict[str, Any] = {
        k: tuple(data[k]) if isinstance(data[k], (list, tuple)) else data[k] for k in keys if k in data
    }
    return SyntheticConfig(
        num_frames=model_cfg.num_frames,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        tubelet_size=model_cfg.tubelet_size,
        **options,
    )


def shard_config(section: DataSection | Mapping[str, Any], model_cfg: AdaMAEConfig) -> ShardDataConfig:
    """``configs/data/shards.yaml`` + the model's clip geometry → ``ShardDataConfig``."""
    from .pipeline import ShardDataConfig

    data = section_values(section)

    keys = (
        "urls",
        "sampling_rate",
        "crop_scales",
        "max_distort",
        "flip",
        "shuffle_buffer",
        "shuffle_initial",
        "workers",
        "prefetch",
        "resampled",
        "max_corrupt_fraction",
        "corrupt_check_after",
        "seed",
        "rand_augment",
        "repeated_aug",
    )
    return ShardDataConfig(
        num_frames=model_cfg.num_frames, img_size=model_cfg.img_size, **{k: data[k] for k in keys if k in data}
    )


def build_data(
    section: DataSection | Mapping[str, Any], model_cfg: AdaMAEConfig, batch_size: int, rank: int, world_size: int
) -> SyntheticClips | ShardClips:
    """The training stream named by ``data.name`` for this rank. ``data.repeated_aug`` (set by fine-tuning from
    ``finetune.repeated_aug``): ``batch_size`` counts views, ``repeated_aug`` of each clip."""
    data = section_values(section)
    if data["name"] == "synthetic":
        import torch

        from .synthetic import SyntheticClips, render_threads

        # Ranks per node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        accelerated = torch.cuda.is_available()
        threads = render_threads(int(data.get("render_threads", 0)), local_ranks, accelerated)
        repeats = int(data.get("repeated_aug", 1))
        cfg = synthetic_config(data, model_cfg)
        # Rendering ahead on a background thread pays off only while the model runs elsewhere: on the CPU the
        # thread takes cores from torch's own threads (measured: the demo's steps 17% slower than rendering
        # each batch in turn, which costs ~20 ms a step).
        prefetch = 2 if accelerated else 0
        return SyntheticClips(cfg, batch_size, rank, world_size, prefetch, threads=threads, repeated_aug=repeats)
    if data["name"] == "shards":
        from .pipeline import ShardClips

        return ShardClips(shard_config(data, model_cfg), batch_size, rank, world_size)
    raise ValueError(f"data={data['name']!r}: expected one of {SOURCES}")


__all__ = [
    "SOURCES",
    "DataSection",
    "ShardData",
    "SyntheticData",
    "build_data",
    "check_repeated_aug",
    "shard_config",
    "synthetic_config",
]
