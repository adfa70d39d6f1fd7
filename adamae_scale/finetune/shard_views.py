"""The multi-view test on WebDataset shards: every video of ``data.val_urls`` decoded once, as views.

Shards go to ranks round-robin (rank r reads shards r, r + world, ...), so no rank reads another's bytes and
every video is evaluated by exactly one rank. A video gives ``temporal_views`` windows of ``num_frames`` frames
``sampling_rate`` apart, evenly spaced over it, resized so the short side is the model's size, and each window
``spatial_views`` crops along the long side (``evaluate.clip_views``). An unreadable video is reported, once,
and left out (``skipped`` in ``eval.json``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base.pixels import normalize
from ..data.pipeline import every_sample_once, mjpeg_frames, shard_urls
from ..data.video import VideoReader, decode_jpeg
from . import evaluate


def window_starts(count: int, num_frames: int, sampling_rate: int, views: int) -> list[np.ndarray]:
    """Frame indices of ``views`` windows evenly spaced over a ``count``-frame video (a short video repeats its
    last frame, as the training windows do)."""
    span = (num_frames - 1) * sampling_rate + 1
    starts = evaluate.view_starts(max(count, span), span, views)
    return [np.minimum(start + sampling_rate * np.arange(num_frames), count - 1) for start in starts]


def _resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 → ``[3, T, h, w]`` float in [0, 1] with ``min(h, w) == size``."""
    _, height, width, _ = frames.shape
    scale = size / min(height, width)
    out = (max(size, round(height * scale)), max(size, round(width * scale)))
    video = frames.permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    video = F.interpolate(video, size=out, mode="bilinear", align_corners=False, antialias=True)
    return video.clamp(0, 1).permute(1, 0, 2, 3)


def decode_views(
    sample: dict[str, Any], num_frames: int, img_size: tuple[int, int], sampling_rate: int, temporal: int, spatial: int
) -> tuple[str, int, str | None, torch.Tensor]:
    """A raw shard sample → ``(key, label, source path, views [temporal × spatial, 3, T, H, W])``, normalised."""
    meta = json.loads(sample["json"])
    count = int(meta["num_frames"])
    windows = window_starts(count, num_frames, sampling_rate, temporal)
    wanted = np.concatenate(windows)
    if "mp4" in sample:
        with VideoReader(sample["mp4"]) as reader:
            frames = reader.read_indices(wanted.tolist(), skip_disposable=True)
    else:
        jpgs = mjpeg_frames(sample["mjpeg"], meta.get("frame_offsets"), count, wanted)  # offsets checked there
        frames = np.stack([decode_jpeg(data) for data in jpgs])
    video = _resize_short_side(torch.from_numpy(frames), min(img_size))
    views = []
    for t in range(temporal):
        window = video[:, t * num_frames : (t + 1) * num_frames]
        views.append(evaluate.clip_views(window, num_frames, img_size, 1, spatial))
    source = meta.get("source")
    return str(sample["__key__"]), int(meta.get("label", -1)), source, normalize(torch.cat(views))


def rank_videos(
    urls: str | list[str],
    rank: int,
    world_size: int,
    num_frames: int,
    img_size: tuple[int, int],
    sampling_rate: int,
    temporal: int,
    spatial: int,
    skipped: list[str],
    done: Callable[[int], bool] | None = None,
) -> Iterator[evaluate.VideoViews]:
    """This rank's videos as views; ``index`` is unique over all ranks. ``done(index)``: a video already
    handled (a resumed feature cache), passed over without decoding."""
    shards = shard_urls(urls)
    mine = [(i, url) for i, url in enumerate(shards) if i % world_size == rank]

    def unreadable(url: str, reason: str, usable: int) -> None:
        skipped.append(f"{url}: {reason}")
        print(f"[adamae] eval: unreadable shard {url}: {reason}", file=sys.stderr, flush=True)

    for shard, url in mine:
        for position, sample in enumerate(every_sample_once([url], unreadable, lambda err: True)):
            index = shard * 10_000_000 + position
            if done is not None and done(index):
                continue
            try:
                key, label, source, views = decode_views(sample, num_frames, img_size, sampling_rate, temporal, spatial)
            except Exception as err:  # a broken video is reported and left out, never fatal
                skipped.append(f"{sample.get('__key__', '?')}: {type(err).__name__}: {err}"[:300])
                print(f"[adamae] eval: skipping {sample.get('__key__', '?')}: {err}", file=sys.stderr, flush=True)
                continue
            yield evaluate.VideoViews(index, key, label, source, views)


__all__ = ["decode_views", "rank_videos", "window_starts"]
