"""Clips for looking at a model: the evaluation window and crop, from video files or from shards.

Evaluation takes no random choice: the centred window of ``num_frames`` frames ``sampling_rate`` apart
(``window_indices`` with no generator), the frames resized so that they cover the clip size (short side
first) and centre-cropped to it. Clips are ``[3, T, H, W]`` uint8 tensors, not yet normalised.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from .pipeline import RngFor, choose_window, every_sample_once, shard_urls
from .video import VideoError, VideoReader, decode_jpeg, read_window


def centre_resize(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 frames → ``[3, T, h, w]`` uint8: the largest centred region with the aspect of
    ``size`` = (h, w), resized to it (for a square clip: short side resized, centre crop)."""
    _, height, width, _ = frames.shape
    out_h, out_w = size
    scale = max(out_h / height, out_w / width)
    crop_h, crop_w = min(height, round(out_h / scale)), min(width, round(out_w / scale))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + crop_h, left : left + crop_w]))
    clip = crop.permute(0, 3, 1, 2)  # (T, 3, h, w), channels-last in memory: the fast uint8 resize
    if (crop_h, crop_w) != (out_h, out_w):
        clip = F.interpolate(clip, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return clip.permute(1, 0, 2, 3).contiguous()  # (3, T, h, w)


def video_clip(path: str | Path, num_frames: int, size: tuple[int, int], sampling_rate: int) -> torch.Tensor:
    """The evaluation clip of a video file; ``VideoError`` when it cannot be read."""
    return centre_resize(read_window(path, num_frames, sampling_rate, rng=None), size)


def shard_clips(
    urls: str | Sequence[str], num_frames: int, size: tuple[int, int], sampling_rate: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, clip)`` for the samples of the shards in their stored order; corrupt samples and unreadable
    shards are reported on stderr and skipped (a shard that fails to read is tried again first). ``ValueError``
    for ``urls`` that name no shards."""
    found = shard_urls(urls)

    def on_unreadable(url: str, reason: str, usable: int) -> None:
        print(f"[adamae] skipping the rest of unreadable shard {url}: {reason}", file=sys.stderr)

    def on_member_error(err: Exception) -> bool:
        print(f"[adamae] skipping a damaged shard member: {err}", file=sys.stderr)
        return True

    samples = every_sample_once(found, on_unreadable, on_member_error)
    # A missing generator makes ``window_indices`` take the centred window.
    centred = cast(RngFor, lambda key, purpose: None)
    for item in choose_window(samples, num_frames, sampling_rate, centred):
        try:
            if "error" in item:
                raise VideoError(item["error"])
            if "mp4" in item:
                with VideoReader(item["mp4"]) as reader:
                    frames = reader.read_indices(item["indices"].tolist())
            else:
                frames = np.stack([decode_jpeg(data) for data in item["jpgs"]])
        except (VideoError, ValueError) as err:
            print(f"[adamae] skipping corrupt sample {item['url']} {item['key']}: {err}", file=sys.stderr)
            continue
        yield str(item["key"]), centre_resize(frames, size)


__all__ = ["centre_resize", "shard_clips", "video_clip"]
