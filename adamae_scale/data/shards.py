"""``adamae-shards``: videos (a folder or an annotation file) → WebDataset tar shards + ``manifest.json``.

Each input video is decoded with PyAV, turned upright and stretched to square pixels as a player shows
it, optionally resampled in time, cut to a maximum duration or split into clips, resized to a short
side, and stored per sample as either an H.264 mp4 or JPEG frames:

    {key}.json           label, source path, fps, frame count, duration, size, storage format, and the
                         source's size, frame rate, sample aspect ratio and display rotation/mirroring
    {key}.mp4            (--store mp4) the re-encoded clip
    {key}.000000.jpg …   (--store jpg) one JPEG per frame

Videos are taken in a seeded shuffled order, processed by worker processes, and written in that order
into ``{prefix}-000000.tar, …`` until a shard reaches its sample or byte target; a video's clips stay
in one shard. Shards are written under a temporary name, fsynced and renamed. ``manifest.json`` is
rewritten (atomically) after every shard, so ``--resume`` keeps the shards it can verify (size and
sha256), re-makes the others from the same videos, and goes on from there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from ..base.atomic import atomic_write_text
from .annotations import (
    FORMATS,
    AnnotationError,
    Record,
    build_label_map,
    index_stems,
    label_index,
    read_annotations,
    resolve,
    scan_folder,
)
from .video import VIDEO_EXTENSIONS, Geometry, Mp4Encoder, VideoError, VideoReader, encode_jpeg, short_side_size

MANIFEST = "manifest.json"
STORES = ("mp4", "jpg")


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("adamae_scale")
    except Exception:  # an uninstalled checkout
        return "unknown"


@dataclass(frozen=True)
class ShardOptions:
    """Everything that decides the bytes of the output (recorded in the manifest; ``--resume`` checks it)."""

    store: str = "mp4"
    short_side: int = 256
    fps: float | None = None
    max_duration: float | None = None
    clip_duration: float | None = None
    min_frames: int = 16
    crf: int = 23
    preset: str = "veryfast"
    gop: int = 16
    jpeg_quality: int = 90
    samples_per_shard: int | None = 1000
    bytes_per_shard: int | None = None
    prefix: str = "shard"
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"--store {self.store!r}: expected one of {STORES}")
        for name in ("fps", "max_duration", "clip_duration"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.min_frames < 1:
            raise ValueError(f"--min-frames must be >= 1, got {self.min_frames}")
        if self.samples_per_shard is None and self.bytes_per_shard is None:
            raise ValueError("give --samples-per-shard or --bytes-per-shard (or both)")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ValueError(f"--prefix {self.prefix!r}: use letters, digits, '-' and '_' only")


# -- one video → samples (runs in worker processes) ------------------------------------------------------


@dataclass
class Sample:
    key: str
    meta: dict[str, Any]
    files: list[tuple[str, bytes]]  # (extension after the key, bytes), json first

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.files)


def _resampled(reader: VideoReader, fps: float | None) -> Iterator[tuple[av.VideoFrame, int]]:
    """(frame, source frames decoded so far) at the source rate, or at ``fps`` by picking the source
    frame nearest to each output time (frames are dropped or repeated)."""
    decoded = 0
    if fps is None:
        for frame in reader.frames():
            decoded += 1
            yield frame, decoded
        return
    emitted, previous, previous_time = 0, None, 0.0
    for frame in reader.frames():
        decoded += 1
        time_ = reader.frame_time(frame)
        if previous is not None:
            midpoint = (previous_time + time_) / 2
            while emitted / fps < midpoint:
                yield previous, decoded - 1
                emitted += 1
        previous, previous_time = frame, time_
    if previous is not None:
        end = previous_time + 1.0 / reader.info.fps  # the last frame lasts one source frame
        while emitted / fps < end - 0.5 / fps or emitted / fps <= previous_time:
            yield previous, decoded
            emitted += 1


class _ClipSink:
    """Collects the frames of one output clip in the chosen storage format."""

    def __init__(self, opts: ShardOptions, width: int, height: int, fps: float):
        self.opts, self.width, self.height, self.fps = opts, width, height, fps
        self.count = 0
        self.jpegs: list[bytes] = []
        self.mp4 = Mp4Encoder(width, height, fps, opts.crf, opts.preset, opts.gop) if opts.store == "mp4" else None
        self.pixel_format = "yuv420p" if self.mp4 is not None else "rgb24"  # what ``add`` takes without converting

    def add(self, frame: av.VideoFrame) -> None:
        """A frame already upright at ``width × height``."""
        if self.mp4 is not None:
            self.mp4.add(frame)
        else:
            self.jpegs.append(encode_jpeg(frame.to_ndarray(format="rgb24"), self.opts.jpeg_quality))
        self.count += 1

    def files(self) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
        """The sample's members and the JSON fields that describe them."""
        if self.mp4 is not None:
            return [("mp4", self.mp4.finish())], {}
        offsets = [0]
        for data in self.jpegs:
            offsets.append(offsets[-1] + len(data))
        return [("mjpeg", b"".join(self.jpegs))], {"frame_offsets": offsets}


def transcode(path: Path, opts: ShardOptions, key_prefix: str, meta: dict[str, Any]) -> list[Sample]:
    """The samples of one video; ``VideoError`` (with the reason) when it cannot be used."""
    with VideoReader(path) as reader:
        info = reader.info
        if info.width <= 0 or info.height <= 0:
            raise VideoError(f"video stream has no picture size ({info.width}x{info.height})")
        fps = opts.fps or info.fps
        max_frames = round(opts.max_duration * fps) if opts.max_duration else None
        clip_frames = max(1, round(opts.clip_duration * fps)) if opts.clip_duration else None
        clips: list[tuple[int, _ClipSink]] = []
        sink, total, source_decoded, stopped_early = None, 0, 0, False
        geometry: Geometry | None = None  # from the first frame, which carries the display matrix
        out_h = out_w = 0
        for frame, source_decoded in _resampled(reader, opts.fps):  # noqa: B007 (its last value is read below)
            if max_frames is not None and total >= max_frames:
                stopped_early = True
                break
            if geometry is None:
                geometry = reader.geometry(frame)
                out_h, out_w = short_side_size(*geometry.display_size(frame.width, frame.height), opts.short_side)
            if sink is None:
                sink = _ClipSink(opts, out_w, out_h, fps)
                clips.append((total, sink))
            sink.add(reader.display_frame(frame, (out_h, out_w), sink.pixel_format, "AREA"))
            total += 1
            if clip_frames is not None and sink.count == clip_frames:
                sink = None
        declared = info.num_frames
        if not stopped_early and declared > 0 and source_decoded < 0.9 * declared:
            raise VideoError(f"truncated: decoded {source_decoded} of the {declared} frames the container declares")
        if total < opts.min_frames:
            raise VideoError(f"too short: {total} frames at {fps:.4g} fps, --min-frames is {opts.min_frames}")
        assert geometry is not None  # at least --min-frames frames were decoded
        samples = []
        for index, (first, clip) in enumerate(clips):
            if clip.count < opts.min_frames:  # the tail of a split video
                continue
            key = f"{key_prefix}_{index:03d}"
            files, described = clip.files()
            clip_meta = {
                "key": key,
                **meta,
                "clip": index,
                "start": round(first / fps, 6),
                "fps": round(fps, 6),
                "num_frames": clip.count,
                "duration": round(clip.count / fps, 6),
                "width": out_w,
                "height": out_h,
                "format": opts.store,
                "source_fps": round(info.fps, 6),
                "source_size": [info.width, info.height],
                **geometry.describe(),
                **described,
            }
            samples.append(Sample(key, clip_meta, [("json", json.dumps(clip_meta).encode())] + files))
        return samples


def process_video(job: tuple[int, int, str, dict[str, Any], dict[str, Any]]) -> tuple[int, list[Sample] | str]:
    """Worker entry point: ``(position, samples)`` or ``(position, failure reason)``; never raises for a
    bad video."""
    position, record_index, path, meta, options = job
    try:
        return position, transcode(Path(path), ShardOptions(**options), f"{record_index:08d}", meta)
    except VideoError as err:
        return position, str(err)
    except Exception as err:  # whatever a strange file triggers in a decoder: report it, go on
        return position, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


# -- ordered parallel map that survives a crashing decoder ---------------------------------------------------


def ordered_map(fn: Callable, jobs: Iterable, workers: int, window: int | None = None) -> Iterator:
    """``fn(job)`` for every job, results in job order, at most ``window`` jobs in flight.

    A worker process that dies (a decoder crash) breaks the pool: the job at the head is retried alone
    and reported as crashed if it kills its worker again; the pool is rebuilt for the others.
    """
    jobs = iter(jobs)
    if workers <= 1:
        yield from map(fn, jobs)
        return
    window = window or 4 * workers
    pool = ProcessPoolExecutor(max_workers=workers)
    pending: deque = deque()

    def refill() -> None:
        while len(pending) < window:
            job = next(jobs, None)
            if job is None:
                return
            pending.append((job, pool.submit(fn, job)))

    try:
        refill()
        while pending:
            job, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                result = _run_alone(fn, job)
                pool = ProcessPoolExecutor(max_workers=workers)
                pending = deque((j, pool.submit(fn, j)) for j, _ in pending)
            yield result
            refill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_alone(fn: Callable[[Any], Any], job: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1) as alone:
        try:
            return alone.submit(fn, job).result()
        except BrokenProcessPool:
            return job[0], "decoder process crashed on this file"


# -- atomic tar shards ---------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardSink:
    """One tar shard, written to a hidden temporary name; ``close`` fsyncs and renames it into place.

    Members get fixed metadata (mtime 0, mode 0444, no owner) so a shard is a pure function of its samples.
    """

    def __init__(self, folder: Path, name: str, first_position: int):
        self.folder, self.name, self.first_position = folder, name, first_position
        self.tmp = folder / f".{name}.tmp-{os.getpid()}"
        self.file = self.tmp.open("wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    @property
    def nbytes(self) -> int:
        return self.file.tell()

    def add(self, sample: Sample) -> None:
        for ext, data in sample.files:
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self, end_position: int) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        entry = {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.tmp.stat().st_size,
            "sha256": sha256_file(self.tmp),
            "records": [self.first_position, end_position],
        }
        os.replace(self.tmp, self.folder / self.name)
        _fsync_dir(self.folder)
        return entry

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(folder)


def verify_shard(folder: Path, entry: dict[str, Any]) -> bool:
    path = folder / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


# -- the whole job -------------------------------------------------------------------------------------------


def load_records(src: Path, root: Path | None, fmt: str) -> tuple[list[Record], Path, dict[str, Path] | None]:
    """Records, the root their paths are relative to, and a stem index when the format names videos by id."""
    if not src.exists():
        raise FileNotFoundError(f"SRC {src}: no such file or directory")
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--root {root}: no such directory")
    if src.is_dir():
        records = scan_folder(src)
        if not records:
            raise FileNotFoundError(f"SRC {src}: no video files found (looked for {', '.join(VIDEO_EXTENSIONS)})")
        return records, src, None
    records = read_annotations(src, fmt)
    base = root or src.parent
    needs_index = any(r.alt_stem is not None or not Path(r.path).suffix for r in records)
    return records, base, index_stems(base) if needs_index else None


def build_shards(
    src: Path,
    out_dir: Path,
    opts: ShardOptions,
    *,
    root: Path | None = None,
    fmt: str = "auto",
    label_map: dict[str, int] | None = None,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole job; returns the final manifest. Bad videos are reported, never fatal."""
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    records, base, stems = load_records(src, root, fmt)
    labels = build_label_map(records, label_map)
    out_dir.mkdir(parents=True, exist_ok=True)

    order = list(range(len(records)))
    if opts.shuffle:
        random.Random(opts.seed).shuffle(order)
    identity = {
        "source": str(src.resolve()),
        "root": str(base.resolve()),
        "format": fmt,
        "num_videos": len(records),
        "options": asdict(opts),
    }
    manifest, redo = _start_manifest(out_dir, identity, labels, resume, log)
    for stale in out_dir.glob(f".{opts.prefix}-*.tar.tmp-*"):  # left by a killed run: never a finished shard
        stale.unlink()
    shards: list[dict[str, Any]] = manifest["shards"]
    failures: list[dict[str, Any]] = manifest["failures"]
    next_position = _range_start(shards)
    failures[:] = [f for f in failures if f["position"] < next_position]  # the rest is done again
    done_positions = next_position - sum(s["records"][1] - s["records"][0] for s in redo)

    def job(position: int) -> tuple[Any, ...]:
        index = order[position]
        record = records[index]
        path = resolve(record, base, stems)
        meta = {
            "label": label_index(record.label, labels),
            "label_name": record.label if isinstance(record.label, str) else None,
            "source": record.path,
        }
        return position, index, str(path) if path is not None else "", meta, asdict(opts)

    def fail(position: int, reason: str) -> dict[str, Any]:
        record = records[order[position]]
        where = f" (line {record.line})" if record.line else ""
        log(f"adamae-shards: skipped {record.path}{where}: {reason}")
        return {"path": record.path, "line": record.line, "reason": reason, "position": position}

    positions = [p for entry in redo for p in range(*entry["records"])] + list(range(next_position, len(order)))
    bar = tqdm(
        total=len(order),
        initial=done_positions,
        unit="video",
        desc="adamae-shards",
        disable=not progress,
        file=sys.stderr,
    )
    results = ordered_map(process_video, (job(p) for p in positions), workers)

    def take(position: int) -> list[Sample] | dict[str, Any]:
        got_position, outcome = next(results)
        assert got_position == position
        bar.update(1)
        if isinstance(outcome, str):
            return fail(position, outcome)
        return outcome

    # 1. shards of a previous run that failed verification: the same videos again, into the same name.
    sink: ShardSink | None
    for entry in redo:
        start, end = entry["records"]
        failures[:] = [f for f in failures if not start <= f["position"] < end]
        sink = ShardSink(out_dir, entry["name"], start)
        for position in range(start, end):
            outcome = take(position)
            if isinstance(outcome, dict):
                failures.append(outcome)
            else:
                for sample in outcome:
                    sink.add(sample)
        shards[shards.index(entry)] = sink.close(end)
        write_manifest(out_dir, manifest)

    # 2. the rest, filling shards up to their targets.
    sink = None
    pending_failures: list[dict[str, Any]] = []
    try:
        for position in range(next_position, len(order)):
            outcome = take(position)
            if isinstance(outcome, dict):
                pending_failures.append(outcome)
                continue
            for sample in outcome:
                if sink is None:
                    sink = ShardSink(out_dir, f"{opts.prefix}-{len(shards):06d}.tar", _range_start(shards))
                sink.add(sample)
            if sink is not None and _full(sink, opts):
                shards.append(sink.close(position + 1))
                failures.extend(pending_failures)
                pending_failures, sink = [], None
                write_manifest(out_dir, manifest)
                bar.set_postfix(shards=len(shards), failed=len(failures))
        if sink is not None:
            shards.append(sink.close(len(order)))
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        bar.close()
    failures.extend(pending_failures)
    failures.sort(key=lambda f: f["position"])
    manifest.update(
        complete=True,
        num_samples=sum(s["samples"] for s in shards),
        num_failures=len(failures),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_manifest(out_dir, manifest)
    return manifest


def _range_start(shards: list[dict[str, Any]]) -> int:
    return max((s["records"][1] for s in shards), default=0)


def _full(sink: ShardSink, opts: ShardOptions) -> bool:
    return (opts.samples_per_shard is not None and sink.samples >= opts.samples_per_shard) or (
        opts.bytes_per_shard is not None and sink.nbytes >= opts.bytes_per_shard
    )


def _start_manifest(
    out_dir: Path, identity: dict[str, Any], labels: dict[str, int], resume: bool, log: Callable[[str], None]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fresh manifest, or (``--resume``) the previous one with the shards that need re-making."""
    path = out_dir / MANIFEST
    if not path.exists():
        existing = sorted(p.name for p in out_dir.glob("*.tar"))
        if existing:
            raise FileExistsError(
                f"{out_dir} holds tar files ({existing[0]}, ...) but no {MANIFEST}: use an empty OUT_DIR"
            )
        manifest = {
            "tool": "adamae-shards",
            "version": tool_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **identity,
            "label_map": labels,
            "complete": False,
            "shards": [],
            "failures": [],
        }
        write_manifest(out_dir, manifest)
        return manifest, []
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that job, or use an empty OUT_DIR")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); remove OUT_DIR to start over") from None
    differing = [k for k in identity if manifest.get(k) != identity[k]]
    if differing:
        detail = "; ".join(f"{k}: was {manifest.get(k)!r}, now {identity[k]!r}" for k in differing)
        raise ValueError(f"--resume: the job in {out_dir} was made with other inputs or options ({detail})")
    redo = []
    for entry in manifest["shards"]:
        if not verify_shard(out_dir, entry):
            log(f"adamae-shards: {entry['name']} is missing or does not match its sha256: re-making it")
            redo.append(entry)
    manifest["complete"] = False
    kept = len(manifest["shards"]) - len(redo)
    log(f"adamae-shards: resuming {out_dir}: {kept} shards verified, {len(redo)} to re-make")
    return manifest, redo


# -- command line ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``500MB``, ``1GiB``, ``2e9`` → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 1GiB, 2e9)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (None and False say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamae-shards",
        description="Turn a folder of videos or an annotation file into WebDataset tar shards "
        "(PREFIX-000000.tar, ...) plus manifest.json, for `adamae-pretrain data=shards`. "
        "A sample is KEY.json (label, source path, fps, frame count, duration, size) plus KEY.mp4 or "
        "KEY.mjpeg. manifest.json lists each shard (samples, bytes, sha256), the label map, the options, "
        "the tool version and every skipped video with the reason. Shards are written under a temporary "
        "name and renamed when complete.",
        epilog="example: adamae-shards k400/train.csv shards/k400 --root k400/videos --workers 16",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        type=Path,
        help="a folder of videos (searched recursively; sub-folder names become labels) or an "
        "annotation file: 'path label' list, CSV 'path,label', Kinetics CSV or SSv2 JSON",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where the shards and manifest.json go")
    src = parser.add_argument_group("input")
    src.add_argument(
        "--root",
        type=Path,
        default=None,
        help="folder that relative paths in the annotation file start from (default: the annotation file's folder)",
    )
    src.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="auto",
        help="annotation format; auto: .json is SSv2, .csv with a youtube_id column is Kinetics, "
        "other .csv is 'path,label', anything else is a space-separated list",
    )
    src.add_argument(
        "--label-map",
        type=Path,
        default=None,
        help="JSON file {label name: index} to number named labels (default: sorted names)",
    )
    video = parser.add_argument_group("preprocessing")
    video.add_argument(
        "--short-side",
        type=int,
        default=256,
        help="resize so the short side is this many pixels, keeping the aspect of the picture as a player shows "
        "it (upright, square pixels) (0: keep the size)",
    )
    video.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: keep)")
    video.add_argument(
        "--max-duration", type=float, default=None, help="keep at most this many seconds from the start of each video"
    )
    video.add_argument(
        "--clip-duration",
        type=float,
        default=None,
        help="split each video into consecutive clips of this many seconds (one sample each; "
        "a tail shorter than --min-frames is dropped)",
    )
    video.add_argument(
        "--min-frames",
        type=int,
        default=16,
        help="videos with fewer frames (after --fps/--max-duration) are reported as too short",
    )
    store = parser.add_argument_group("storage")
    store.add_argument(
        "--store",
        choices=STORES,
        default="mp4",
        help="per sample: mp4 = the clip re-encoded as H.264; jpg = every frame as a JPEG, "
        "back to back in one .mjpeg member (about 10x larger, decodes faster)",
    )
    store.add_argument("--crf", type=int, default=23, help="H.264 quality (lower = better, larger)")
    store.add_argument("--preset", default="veryfast", help="x264 speed preset")
    store.add_argument(
        "--gop",
        type=int,
        default=16,
        help="H.264 key-frame interval in frames: smaller = faster random windows, larger files",
    )
    store.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-95 for --store jpg")
    out = parser.add_argument_group("shards")
    out.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="close a shard once it holds this many samples (0: no sample limit)",
    )
    out.add_argument(
        "--bytes-per-shard",
        type=parse_size,
        default=None,
        help="close a shard once it reaches this size, e.g. 1GB (with --samples-per-shard, whichever comes first)",
    )
    out.add_argument("--prefix", default="shard", help="shard names are PREFIX-000000.tar, ...")
    out.add_argument("--seed", type=int, default=0, help="seed of the shuffle of videos across shards")
    out.add_argument("--no-shuffle", action="store_true", help="keep the input order instead of shuffling")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding/encoding processes")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the job in OUT_DIR: keep shards that match manifest.json (size and sha256), "
        "re-make the others, process the remaining videos",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = ShardOptions(
            store=args.store,
            short_side=args.short_side,
            fps=args.fps,
            max_duration=args.max_duration,
            clip_duration=args.clip_duration,
            min_frames=args.min_frames,
            crf=args.crf,
            preset=args.preset,
            gop=args.gop,
            jpeg_quality=args.jpeg_quality,
            samples_per_shard=args.samples_per_shard or None,
            bytes_per_shard=args.bytes_per_shard,
            prefix=args.prefix,
            seed=args.seed,
            shuffle=not args.no_shuffle,
        )
        label_map = None
        if args.label_map is not None:
            try:
                label_map = {str(k): int(v) for k, v in json.loads(args.label_map.read_text()).items()}
            except (OSError, ValueError, AttributeError) as err:
                raise ValueError(
                    f"--label-map {args.label_map}: expected a JSON object {{name: index}} ({err})"
                ) from None
        manifest = build_shards(
            args.src,
            args.out_dir,
            opts,
            root=args.root,
            fmt=args.fmt,
            label_map=label_map,
            workers=max(1, args.workers),
            resume=args.resume,
            progress=not args.no_progress,
        )
    except (AnnotationError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"adamae-shards: error: {err}", file=sys.stderr)
        return 2
    print(
        f"adamae-shards: {manifest['num_samples']} samples in {len(manifest['shards'])} shards in {args.out_dir}"
        f" ({manifest['num_failures']} videos skipped, reasons in {args.out_dir / MANIFEST})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
