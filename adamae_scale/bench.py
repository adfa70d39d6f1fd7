"""``adamae-bench``: benchmarks that print one JSON object each. Subcommands:

- ``step``: optimizer steps per second, model FLOP/s and peak memory of the real engine on a fixed batch.
- ``memory``: per-rank memory implied by a ZeRO stage, and measured from real pre-training steps.
- ``data``: training clips per second per DataLoader worker from tar shards (each storage format
  present) against the reference way of loading, decoding a random window straight from the original
  video files; and their ratio.

Add a benchmark as another subcommand: a ``register_*`` function that adds its parser and sets
``func`` to a callable taking the parsed arguments and returning a JSON-able dict.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .data.pipeline import ShardClips, ShardDataConfig, shard_urls
from .data.transforms import REFERENCE_CROP_SCALES, augment_clip
from .data.video import VIDEO_EXTENSIONS, read_window

# -- data ----------------------------------------------------------------------------------------------------


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


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
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


def register_data(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="clips/s per worker from shards vs decoding windows from the original videos",
        description="Training clips (multi-scale crop, resize, normalise) per second per DataLoader worker, from "
        "tar shards (each storage format found) and, as the baseline, from random windows decoded "
        "straight from the original video files.",
    )
    parser.add_argument(
        "--urls",
        action="append",
        required=True,
        help="shards (folder, manifest.json, brace pattern); repeat for several sets",
    )
    parser.add_argument("--videos", required=True, help="folder of the original video files (recursive)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (0: in-process)")
    parser.add_argument("--clips", type=int, default=64, help="clips timed per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing starts")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per batch")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--img-size", type=int, default=224, help="clip height and width")
    parser.add_argument("--sampling-rate", type=int, default=4, help="frames between sampled frames")
    parser.add_argument("--shuffle-buffer", type=int, default=16, help="shard pipeline shuffle buffer")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="also measure each path in-process against CPU time (cpu_* fields): steady on a "
        "machine shared with other work",
    )
    parser.set_defaults(func=bench_data)


# -- memory and step: key=value settings, the unknown keys being adamae-pretrain overrides ------------------


def split_settings(benchmark: str, settings: list[str], defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` settings → (this benchmark's options over ``defaults``, the pre-training overrides)."""
    options, overrides = dict(defaults), []
    for arg in settings:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"{benchmark}: expected key=value, got {arg!r}")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    return options, overrides


def bench_memory(args: argparse.Namespace) -> dict:
    from .engine import memory

    return memory.run(*split_settings("memory", args.settings, memory.DEFAULTS))


def bench_step(args: argparse.Namespace) -> dict | None:
    from . import speed

    return speed.run(*split_settings("step", args.settings, speed.DEFAULTS))


def _register_settings_benchmark(
    sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], Any], help: str, description: str
) -> None:
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("settings", nargs="*", help="key=value settings (see above)")
    parser.set_defaults(func=func)


def register_memory(sub: argparse._SubParsersAction) -> None:
    _register_settings_benchmark(
        sub,
        "memory",
        bench_memory,
        help="per-rank memory of a model under a ZeRO stage (model and, with run=true, measured)",
        description="Prints params and bytes_per_rank (params, grads, optimizer, total) implied by the ZeRO stage "
        "and precision; with run=true also measured_peak_bytes_per_rank from real pre-training steps "
        "(micro-batch 1, launched with torchrun for world_size > 1). Settings: model=NAME ds=NAME "
        "world_size=N run=true|false steps=K; any other key=value is passed to adamae-pretrain "
        "(e.g. precision=bf16 model.checkpoint_every=1).",
    )


def register_step(sub: argparse._SubParsersAction) -> None:
    _register_settings_benchmark(
        sub,
        "step",
        bench_step,
        help="training steps per second of the real engine on a fixed batch (no data pipeline)",
        description="Times optimizer steps (forward, losses, backward, ZeRO communication, AdamW) on one fixed "
        "synthetic batch on the device, after warm-up. Prints seconds_per_step, clips_per_s, the FLOPs "
        "a step executes counted by torch's FlopCounterMode (recomputation included), the achieved "
        "TFLOP/s and the peak memory per rank. Settings: steps=K warmup=K; any other key=value is an "
        "adamae-pretrain override (model=vit_large ds=zero1 precision=bf16 train.micro_batch_size=16 "
        "model.checkpoint_every=1 ...). Launch with torchrun for several ranks; rank 0 prints.",
    )


REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = [register_data, register_memory, register_step]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamae-bench", description="Benchmarks; each prints one JSON object.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for register in REGISTRY:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"adamae-bench: error: {err}", file=sys.stderr)
        return 2
    if result is not None:  # multi-rank benchmarks report from rank 0 only
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
