"""Clip-level pixel transforms: pure functions on ``[..., C, T, H, W]`` tensors (and, for augmentation,
``[T, H, W, 3]`` uint8 frames). Randomness comes in as an explicit ``numpy`` generator."""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base.pixels import IMAGENET_MEAN, normalized

# -- training augmentation (the reference recipe: multi-scale crop → resize; flip off by default) ----------

REFERENCE_CROP_SCALES = (1.0, 0.875, 0.75, 0.66)


def multi_scale_crop_box(
    height: int,
    width: int,
    out_size: tuple[int, int],
    scales: tuple[float, ...] = REFERENCE_CROP_SCALES,
    max_distort: int = 1,
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of one multi-scale crop, as VideoMAE's GroupMultiScaleCrop picks it.

    Crop sides are ``scale × short side`` for each scale (snapped to the output side when within 3 px),
    height and width scales at most ``max_distort`` steps apart; the corner is one of 13 fixed grid
    positions (corners, centre, edge midpoints, quarter points). ``rng=None`` gives the centre crop of
    the first scale.
    """
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    crop_hs = [out_size[0] if abs(s - out_size[0]) < 3 else s for s in sides]
    crop_ws = [out_size[1] if abs(s - out_size[1]) < 3 else s for s in sides]
    pairs = [(h, w) for i, h in enumerate(crop_hs) for j, w in enumerate(crop_ws) if abs(i - j) <= max_distort]
    if rng is None:
        crop_h, crop_w = crop_hs[0], crop_ws[0]
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w
    crop_h, crop_w = pairs[int(rng.integers(len(pairs)))]
    crop_h, crop_w = min(crop_h, height), min(crop_w, width)
    h_step, w_step = (height - crop_h) // 4, (width - crop_w) // 4
    grid = [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),  # corners and centre
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),  # edge midpoints
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),
    ]  # quarter points
    gy, gx = grid[int(rng.integers(len(grid)))]
    return gy * h_step, gx * w_step, crop_h, crop_w


def crop_resize(
    frames: np.ndarray,
    out_size: tuple[int, int],
    scales: tuple[float, ...] = REFERENCE_CROP_SCALES,
    max_distort: int = 1,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 frames → ``[3, T, h, w]`` uint8 clip (a view): multi-scale crop, resize, flip.

    One crop box (and one flip decision) for the whole clip, so motion stays coherent. The resize runs
    on uint8 channels-last frames (bilinear with antialiasing, like PIL's), the fast path on CPU.
    """
    _, height, width, _ = frames.shape
    out_size = (int(out_size[0]), int(out_size[1]))
    top, left, crop_h, crop_w = multi_scale_crop_box(height, width, out_size, scales, max_distort, rng)
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + crop_h, left : left + crop_w]))
    clip = crop.permute(0, 3, 1, 2)  # (T, 3, h, w), channels-last in memory
    if (crop_h, crop_w) != out_size:
        clip = F.interpolate(clip, size=out_size, mode="bilinear", align_corners=False, antialias=True)
    if flip and rng is not None and rng.random() < 0.5:
        clip = clip.flip(-1)
    return clip.permute(1, 0, 2, 3)  # (3, T, h, w)


def augment_clip(
    frames: np.ndarray,
    out_size: tuple[int, int],
    scales: tuple[float, ...] = REFERENCE_CROP_SCALES,
    max_distort: int = 1,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 frames → ``[3, T, h, w]`` float ImageNet-normalised training clip."""
    return normalized(crop_resize(frames, out_size, scales, max_distort, flip, rng))


# -- fine-tuning augmentation ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _rand_augment(policy: str, short_side: int) -> Any:
    from timm.data.auto_augment import rand_augment_transform

    # The reference's hparams: translations up to 45% of the image side, fill with the ImageNet mean colour.
    mean = tuple(round(255 * m) for m in IMAGENET_MEAN)
    return rand_augment_transform(policy, {"translate_const": int(short_side * 0.45), "img_mean": mean})


def rand_augment_clip(clip: torch.Tensor, policy: str, seed: int) -> torch.Tensor:
    """timm's RandAugment (``policy``, e.g. ``rand-m7-n4-mstd0.5-inc1``) applied identically to every frame of
    a uint8 ``[3, T, H, W]`` clip: the same operations with the same magnitudes, drawn once from ``seed``.

    timm draws from Python's and numpy's global generators; they are seeded for the clip, rewound to that
    state for every frame, and restored afterwards."""
    from PIL import Image

    transform = _rand_augment(policy, min(clip.shape[-2:]))
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    start = random.getstate(), np.random.get_state()
    frames = []
    try:
        for frame in clip.permute(1, 2, 3, 0).numpy():  # (H, W, 3) each
            random.setstate(start[0])
            np.random.set_state(start[1])
            frames.append(np.asarray(transform(Image.fromarray(frame))))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).contiguous()
