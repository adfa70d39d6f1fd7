"""The ``data`` section of a run config, typed: one frozen dataclass per ``configs/data/*.yaml`` choice.

A field here is a key of the YAML file of the same name (``data=synthetic``, ``data=shards``), with the same
default. Adding a key: a field here and a line in the YAML; the run config (``adamae_scale.config``) picks it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SyntheticData:
    """``configs/data/synthetic.yaml``: seeded clips of moving textured objects (``data/synthetic.py``)."""

    name: str = "synthetic"
    num_objects: tuple[int, int] = (1, 3)
    object_size: tuple[float, float] = (0.125, 0.22)
    speed: tuple[float, float] = (0.015, 0.05)
    background: str = "smooth"
    object_texture: int = 4
    motion_threshold: float = 0.125
    seed: int = 0
    label_task: str = "none"
    eval_seed: int = 1_000_003
    render_threads: int = 0
    repeated_aug: int = 1  # set by fine-tuning from finetune.repeated_aug


@dataclass(frozen=True)
class ShardData:
    """``configs/data/shards.yaml``: WebDataset shards made by ``adamae-shards`` (``data/pipeline.py``)."""

    name: str = "shards"
    # A pattern, a folder, a manifest or a list of them (``Any``: OmegaConf has no union of str and list).
    urls: Any = None
    val_urls: Any = None
    sampling_rate: int = 4
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    flip: bool = False
    rand_augment: str | None = None
    shuffle_buffer: int = 256
    shuffle_initial: int = 64
    workers: int = 4
    prefetch: int = 2
    resampled: bool = False
    max_corrupt_fraction: float = 0.01
    corrupt_check_after: int = 200
    seed: int = 0
    repeated_aug: int = 1


DataSection = SyntheticData | ShardData
SECTIONS: dict[str, type[SyntheticData] | type[ShardData]] = {"synthetic": SyntheticData, "shards": ShardData}


def section_values(data: DataSection | Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a data section (typed, or a plain mapping as tests and tools write them)."""
    return asdict(data) if isinstance(data, (SyntheticData, ShardData)) else dict(data)


def check_repeated_aug(field: str, repeats: Any, micro_batch_size: int | None) -> None:
    """Repeated augmentation (``field``: ``data.repeated_aug`` or ``finetune.repeated_aug``): an integer >= 1, and
    ``train.micro_batch_size``, which counts views, a whole number of clips (``None``: no batch to check)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"{field}={repeats!r}: expected an integer >= 1 (1 = off)")
    if micro_batch_size is not None and micro_batch_size % repeats:
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size}: it counts views, {field}={repeats} of each clip, so it "
            f"must be a multiple of it (or set {field}=1)"
        )
