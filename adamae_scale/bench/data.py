"""``adamae-bench data``: training clips per second per DataLoader worker from tar shards (each storage
format present) against the reference way of loading, decoding a random window straight from the original
video files; and their ratio. The shard path has to beat the baseline by enough to keep a GPU fed."""

from __future__ import annotations

import argparse
import functools
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..data.pipeline import ShardClips, ShardDataConfig, shard_urls
from ..data.transforms import REFERENCE_CROP_SCALES, augment_clip
from ..data.video import VIDEO_EXTENSIONS, read_window


def shard_format(url: str) -> str:
    """``mp4`` or ``jpg`` (one .mjpeg member or .jpg members): what the first sample of a local shard stores."""
    with tarfile.open(url) as tar:
        for member in tar:
            if member.name.endswith(".mp4"):
                return "mp4"
            if member.name.endswith((".mjpeg", ".jpg")):
                return "jpg"
    raise ValueError(f"{url}: no .mp4 or .jpg member")


class VideoFileClips(Dataset):
    """The baseline: a random window decoded from an original video file, then the same augmentation."""

    def __init__(self, files: list[Path], num_frames: int, sampling_rate: int, img_size: tuple[int, int], seed: int):
        self.files, self.num_frames, self.sampling_rate = files, num_frames, sampling_rate
        self.img_size, self.seed = img_size, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng()  # fresh entropy: the sampler may draw a file again
        frames = read_window(self.files[index], self.num_frames, self.sampling_rate, rng)
        return augment_clip(frames, self.img_size, REFERENCE_CROP_SCALES, 1, False, rng)


def _next_video(stream: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    return next(stream)["video"]


def _clips_per_second(
    next_clips: Callable[[], torch.Tensor], clips: int, warmup: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    for _ in range(warmup):  # worker start-up and first decodes are not throughput
        next_clips()
    done, start = 0, clock()
    while done < clips:
        done += len(next_clips())
    return done / (clock() - start)


def _measure(
    groups: dict[str, list[str]], files: list[Path], args: argparse.Namespace, workers: int, clock: Callable[[], float]
) -> tuple[dict[str, float], float]:
    """Clips per second per worker: ``{format: shards}`` and the baseline."""
    per_worker = max(workers, 1)
    size = (args.img_size, args.img_size)
    shards: dict[str, float] = {}
    for fmt, urls in sorted(groups.items()):
        cfg = ShardDataConfig(
            urls=urls,
            num_frames=args.num_frames,
            img_size=size,
            sampling_rate=args.sampling_rate,
            workers=workers,
            resampled=True,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
        )
        stream = ShardClips(cfg, args.batch_size)
        shards[fmt] = (
            _clips_per_second(functools.partial(_next_video, stream), args.clips, args.warmup, clock) / per_worker
        )
        stream.close()
    dataset = VideoFileClips(files, args.num_frames, args.sampling_rate, size, args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=workers,
        sampler=RandomSampler(
            dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(args.seed)
        ),
        prefetch_factor=2 if workers > 0 else None,
    )
    batches = iter(loader)
    baseline = _clips_per_second(lambda: next(batches), args.clips, args.warmup, clock) / per_worker
    return shards, baseline


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The report for the parsed ``adamae-bench data`` arguments (see ``register`` in ``adamae_scale.bench``)."""
    torch.set_num_threads(1)  # one core per worker process, like the workers themselves
    groups: dict[str, list[str]] = {}
    for urls in args.urls:
        for url in shard_urls(urls):
            groups.setdefault(shard_format(url), []).append(url)
    files = sorted(p for p in Path(args.videos).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"--videos {args.videos}: no video files")

    shards, baseline = _measure(groups, files, args, args.num_workers, time.perf_counter)
    result = {
        "benchmark": "data",
        "clip": [args.num_frames, args.img_size, args.img_size],
        "sampling_rate": args.sampling_rate,
        "num_workers": args.num_workers,
        "clips_timed": args.clips,
        "clips_per_s_per_worker": {fmt: round(v, 3) for fmt, v in shards.items()},
        "baseline_clips_per_s_per_worker": round(baseline, 3),
        "ratio": {fmt: round(v / baseline, 2) for fmt, v in shards.items()},
    }
    if args.cpu_time:
        # The same work in this process against its CPU time: what one worker does per second of a
        # core, whatever else the machine runs meanwhile (wall-clock figures swing with other load).
        cpu_shards, cpu_baseline = _measure(groups, files, args, 0, time.process_time)
        result.update(
            cpu_clips_per_s={fmt: round(v, 3) for fmt, v in cpu_shards.items()},
            cpu_baseline_clips_per_s=round(cpu_baseline, 3),
            cpu_ratio={fmt: round(v / cpu_baseline, 2) for fmt, v in cpu_shards.items()},
        )
    result.update(
        shards={fmt: len(urls) for fmt, urls in groups.items()},
        videos=len(files),
        cpu_count=os.cpu_count(),
        load_average_1m=round(os.getloadavg()[0], 2),
    )
    return result
