"""Embedded default data: seeded clips of textured objects moving over a static background.

Every clip comes with the per-token ground truth of which tokens contain a moving object, so that
``focus_ratio`` (does the sampler put visible tokens on motion?) can be measured. The ground truth
goes to the metrics only: nothing in the model or the losses sees it.

Clip ``i`` is a pure function of ``(seed, i)``, so a stream resumes exactly from a sample index.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.pixels import normalize_
from ..base.seeds import derive_seed
from .sections import check_repeated_aug


@dataclass
class SyntheticConfig:
    num_frames: int = 16
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    tubelet_size: int = 2
    num_objects: tuple[int, int] = (1, 3)  # inclusive range per clip
    object_size: tuple[float, float] = (0.125, 0.22)  # side / diameter, as a fraction of the short side
    speed: tuple[float, float] = (0.015, 0.05)  # pixels per frame, as a fraction of the short side
    background: str = "smooth"  # "smooth" (2x2 colour gradient), "blobs" (4x4 colour field), "texture" (noise)
    object_texture: int = 0  # texture cells per object side; 0 = per-pixel noise
    motion_threshold: float = 0.125  # a token is "motion" when objects cover this fraction of its pixels
    seed: int = 0
    # "motion": every clip gets one of MOTION_CLASSES labels, set by how its objects move (axis × speed band);
    # appearance, sizes and positions stay random, so only motion tells the classes apart.
    label_task: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        if self.background not in BACKGROUNDS:
            raise ValueError(f"data.background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        if self.label_task not in LABEL_TASKS:
            raise ValueError(f"data.label_task must be one of {LABEL_TASKS}, got {self.label_task!r}")

    @property
    def num_classes(self) -> int:
        return len(MOTION_CLASSES) if self.label_task == "motion" else 0


LABEL_TASKS = ("none", "motion")
# (axis, speed band) per class: the axis survives the bounces off the borders, and so does the speed.
MOTION_CLASSES = (("horizontal", "slow"), ("horizontal", "fast"), ("vertical", "slow"), ("vertical", "fast"))


def clip_label(cfg: SyntheticConfig, index: int) -> int:
    """The class of clip ``index`` (``label_task="motion"``), from a generator of its own, so unlabelled clips
    are unchanged."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, index, 7_777_777_777))
    return int(torch.randint(len(MOTION_CLASSES), (), generator=gen))


def _labelled_motion(cfg: SyntheticConfig, label: int, gen: torch.Generator) -> tuple[float, float]:
    """(speed as a fraction of the short side per frame, angle) of one object of a clip of class ``label``."""
    axis, band = MOTION_CLASSES[label]
    low, high = cfg.speed
    third = (high - low) / 3
    speed = float(_uniform(gen, low, low + third)) if band == "slow" else float(_uniform(gen, high - third, high))
    sign = float(torch.randint(2, (), generator=gen)) * torch.pi  # either way along the axis
    return speed, (0.0 if axis == "horizontal" else torch.pi / 2) + sign


def _uniform(gen: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen)


BACKGROUNDS = {"smooth": (2, "bilinear"), "blobs": (4, "bicubic"), "texture": (0, "nearest")}


def _background(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    h, w = cfg.img_size
    cells, mode = BACKGROUNDS[cfg.background]
    field = torch.rand(1, 3, cells or h, cells or w, generator=gen)
    corners = {"align_corners": True} if mode == "bilinear" else {}
    return F.interpolate(field, size=(h, w), mode=mode, **corners).clamp(0, 1)[0]  # (3, H, W)


def _bounce(start: torch.Tensor, velocity: torch.Tensor, frames: int, low: float, high: float) -> torch.Tensor:
    """Positions over ``frames`` of a point moving at constant speed, reflected at [low, high]."""
    span = high - low
    raw = start + velocity * torch.arange(frames, dtype=torch.float32) - low  # (T,)
    folded = torch.remainder(raw, 2 * span)
    return low + torch.where(folded > span, 2 * span - folded, folded)


def _window(center: torch.Tensor, half: float, length: int, limit: int) -> torch.Tensor:
    """Per frame, the ``length`` pixel coordinates from just below ``center - half``, clamped to the image
    (a clamped coordinate repeats a pixel with the same values, so writing it twice is harmless)."""
    start = torch.floor(center - half).long()[:, None]  # (T, 1)
    return (start + torch.arange(length)).clamp(0, limit - 1)  # (T, length)


def render_clip(cfg: SyntheticConfig, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``index``: ``(video [3, T, H, W] in [0, 1], motion [N] bool)`` with N tokens (t, h, w)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, index))
    t_frames, (h, w) = cfg.num_frames, cfg.img_size
    short = min(h, w)
    frames = _background(cfg, gen)[:, None].repeat(1, t_frames, 1, 1)  # (3, T, H, W)
    covered = torch.zeros(t_frames, h, w, dtype=torch.bool)
    frame_index = torch.arange(t_frames)[:, None, None]  # (T, 1, 1)

    count = int(torch.randint(cfg.num_objects[0], cfg.num_objects[1] + 1, (), generator=gen))
    label_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, index, 3_333_333_333))
    for _ in range(count):
        size = max(2, int(_uniform(gen, *cfg.object_size) * short))
        half = size / 2
        speed = float(_uniform(gen, *cfg.speed)) * short
        angle = float(_uniform(gen, 0.0, 2 * torch.pi))
        if cfg.label_task == "motion":
            fraction, angle = _labelled_motion(cfg, clip_label(cfg, index), label_gen)
            speed = fraction * short
        cy = _bounce(_uniform(gen, half, h - half), speed * torch.sin(torch.tensor(angle)), t_frames, half, h - half)
        cx = _bounce(_uniform(gen, half, w - half), speed * torch.cos(torch.tensor(angle)), t_frames, half, w - half)
        # Only a (size + 2)-pixel window around the object can be inside it: work there, not on the frame.
        rows = _window(cy, half, size + 2, h)  # (T, S)
        cols = _window(cx, half, size + 2, w)  # (T, S)
        dy = rows.float()[:, :, None] - cy[:, None, None]  # (T, S, 1)
        dx = cols.float()[:, None, :] - cx[:, None, None]  # (T, 1, S)
        if torch.rand((), generator=gen) < 0.5:
            inside = (dy.abs() < half) & (dx.abs() < half)  # square, (T, S, S)
        else:
            inside = dy**2 + dx**2 < half**2  # disk
        # The texture moves with the object: sample it at object-local coordinates.
        cells = cfg.object_texture or size
        texture = F.interpolate(torch.rand(1, 3, cells, cells, generator=gen), size=(size, size), mode="nearest")[0]
        ly = (dy + half).long().clamp(0, size - 1).expand_as(inside)
        lx = (dx + half).long().clamp(0, size - 1).expand_as(inside)
        pixels = (frame_index, rows[:, :, None], cols[:, None, :])  # indexes (T, S, S) pixels of the frames
        frames[(slice(None), *pixels)] = torch.where(inside[None], texture[:, ly, lx], frames[(slice(None), *pixels)])
        covered[pixels] = covered[pixels] | inside

    motion = token_coverage(covered, cfg.tubelet_size, cfg.patch_size) >= cfg.motion_threshold
    return frames, motion


def token_coverage(covered: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """Fraction of each token's pixels that are ``covered``: ``[T, H, W]`` bool → ``[N]`` (t, h, w order)."""
    t, h, w = covered.shape
    cubes = covered.float().view(t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    return cubes.mean(dim=(1, 3, 5)).flatten()


def render_threads(setting: int, local_world_size: int, accelerated: bool) -> int:
    """``data.render_threads``: the value itself; for 0, one thread when training on the CPU (rendering
    would take cores from the model), else this rank's share of the usable cores, at most 8."""
    if setting > 0:
        return setting
    if not accelerated:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(local_world_size, 1)))


class SyntheticClips:
    """Infinite batches ``{"video": [B, 3, T, H, W] normalised, "motion": [B, N] bool}``.

    Rank ``r`` of ``world`` takes the clips ``(k * world + r) * B + i``; ``state_dict()`` is the index of
    the next batch, so a resumed run sees exactly the clips an uninterrupted one would. A background
    thread renders the next ``prefetch`` batches while the current one trains (``build_data`` asks for this only
    with an accelerator: on the CPU the thread would slow the model more than rendering costs), each batch's clips on
    ``threads`` threads (torch ops release the GIL: one thread makes a batch of 32 16x224^2 clips in
    ~0.4 s, slower than one H200 trains ViT-B on it).

    ``repeated_aug = r`` (fine-tuning's repeated augmentation): a batch holds ``B / r`` rendered clips, each
    ``r`` times in a row; the views then differ by what the objective draws per sample (random erasing, mixup
    partners), as this source has no crop or RandAugment of its own.
    """

    def __init__(
        self,
        cfg: SyntheticConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        threads: int = 1,
        repeated_aug: int = 1,
    ):
        check_repeated_aug("data.repeated_aug", repeated_aug, batch_size)
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.repeated_aug = repeated_aug
        self.next_batch = 0
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthetic") if prefetch > 0 else None
        self._renderers = ThreadPoolExecutor(threads, thread_name_prefix="synthetic-render") if threads > 1 else None
        self._pending: deque[tuple[int, Future]] = deque()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of this rank's stream (a pure function of the index)."""
        count = self.batch_size // self.repeated_aug  # clips
        first = (index * self.world_size + self.rank) * count
        render = functools.partial(render_clip, self.cfg)
        indices = range(first, first + count)
        clips = list(self._renderers.map(render, indices) if self._renderers else map(render, indices))
        video = torch.stack([c[0] for c in clips])  # (B / r, 3, T, H, W) in [0, 1]
        batch = {"video": normalize_(video), "motion": torch.stack([c[1] for c in clips])}
        if self.cfg.label_task != "none":
            batch["label"] = torch.tensor([clip_label(self.cfg, i) for i in indices], dtype=torch.long)
        if self.repeated_aug > 1:
            batch = {key: value.repeat_interleave(self.repeated_aug, dim=0) for key, value in batch.items()}
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            result = self.batch(self.next_batch)
        else:
            while len(self._pending) < self.prefetch + 1:
                index = self.next_batch + len(self._pending)
                self._pending.append((index, self._pool.submit(self.batch, index)))
            index, future = self._pending.popleft()
            assert index == self.next_batch
            result = future.result()
        self.next_batch += 1
        return result

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._drop_pending()
        self.next_batch = int(state["next_batch"])

    def _drop_pending(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop rendering ahead and join the threads, so none is still in a torch op when the process (and its
        process group) goes away. The stream can be used again afterwards: it renders without prefetching."""
        self._drop_pending()
        for pool in (self._pool, self._renderers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._renderers = None
