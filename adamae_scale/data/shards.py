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
import multiprocessing
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from . import storage
from .annotations import (
    Record,
    build_label_map,
    index_stems,
    label_index,
    parse_annotations,
    read_annotations,
    records_of,
    resolve,
    resolve_url,
    scan_folder,
)
from .video import VIDEO_EXTENSIONS, Geometry, Mp4Encoder, VideoError, VideoReader, encode_jpeg, short_side_size

MANIFEST = "manifest.json"
STORES = ("mp4", "jpg")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)


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
        if self.short_side < 0:
            raise ValueError(f"--short-side must be >= 0 (0: keep the size), got {self.short_side}")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"--preset {self.preset!r}: expected one of libx264's presets {', '.join(X264_PRESETS)}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"--crf must be in 0-51 (libx264's range), got {self.crf}")
        if self.gop < 1:
            raise ValueError(f"--gop must be >= 1, got {self.gop}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1-100, got {self.jpeg_quality}")
        for name in ("samples_per_shard", "bytes_per_shard"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.clip_duration is not None and self.fps is not None:
            clip_frames = max(1, round(self.clip_duration * self.fps))
            if clip_frames < self.min_frames:
                raise ValueError(
                    f"--clip-duration {self.clip_duration} at --fps {self.fps} gives clips of {clip_frames} frames, "
                    f"fewer than --min-frames {self.min_frames}: expected a longer --clip-duration"
                )
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


def transcode(path: Path | bytes, opts: ShardOptions, key_prefix: str, meta: dict[str, Any]) -> list[Sample]:
    """The samples of one video (a file, or its bytes); ``VideoError`` (with the reason) when it cannot be used."""
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
        if not samples:
            raise VideoError(
                f"clips of {clip_frames} frames at {fps:.4g} fps (--clip-duration {opts.clip_duration}) are fewer "
                f"than --min-frames {opts.min_frames}"
            )
        return samples


def process_video(job: tuple[int, int, str, dict[str, Any], dict[str, Any]]) -> tuple[int, list[Sample] | str]:
    """Worker entry point: ``(position, samples)`` or ``(position, failure reason)``; never raises for a
    bad video."""
    position, record_index, path, meta, options = job
    try:
        return position, transcode(_video_source(path), ShardOptions(**options), f"{record_index:08d}", meta)
    except VideoError as err:
        return position, str(err)
    except Exception as err:  # whatever a strange file triggers in a decoder: report it, go on
        return position, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _video_source(path: str) -> Path | bytes:
    """A local video file, or the bytes of one in object storage (``VideoError`` when it cannot be fetched)."""
    if not storage.is_url(path):
        return Path(path)
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise VideoError("file not found") from None
    except storage.StorageError as err:
        raise VideoError(f"cannot be fetched: {err}") from None


# -- ordered parallel map that survives a crashing decoder ---------------------------------------------------


def ordered_map(fn: Callable, jobs: Iterable, workers: int, window: int | None = None) -> Iterator:
    """``fn(job)`` for every job, results in job order, at most ``window`` jobs in flight.

    A worker process that dies (a decoder crash) breaks the pool: the job at the head is retried alone
    and reported as crashed if it kills its worker again; the pool is rebuilt for the others. Even one worker
    is a child process, so that a crash never takes this process down.
    """
    jobs = iter(jobs)
    workers = max(1, workers)
    window = window or 4 * workers
    pool = _process_pool(workers)
    pending: deque = deque()

    def submit(job: Any) -> Future | None:
        try:
            return pool.submit(fn, job)
        except BrokenProcessPool:  # a job submitted earlier crashed meanwhile: handled when this one's turn comes
            return None

    def refill() -> None:
        while len(pending) < window:
            job = next(jobs, None)
            if job is None:
                return
            pending.append((job, submit(job)))

    try:
        refill()
        while pending:
            job, future = pending.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool
                result = future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                result = _run_alone(fn, job)
                pool = _process_pool(workers)
                pending = deque((j, submit(j)) for j, _ in pending)
            yield result
            refill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Workers started fresh ("spawn"), never forked from this process: by the time a pool starts, this process may
    run threads (fsspec's I/O loop for s3:// sources, Ray's, a test runner's), and a child forked while one of them
    holds a lock waits on it forever. Unlike a fork server, each pool's workers see the environment of the moment
    (credentials, endpoints)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_alone(fn: Callable[[Any], Any], job: Any) -> Any:
    with _process_pool(1) as alone:
        try:
            return alone.submit(fn, job).result()
        except BrokenProcessPool:
            return job[0], "decoder process crashed on this file"


# -- atomic tar shards ---------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardSink:
    """One tar shard, written to a hidden temporary name; ``close`` fsyncs and renames it into place (in
    object storage: uploads it whole from a local temporary file).

    Members get fixed metadata (mtime 0, mode 0444, no owner) so a shard is a pure function of its samples.
    """

    def __init__(self, folder: Path | str, name: str, first_position: int):
        self.folder, self.name, self.first_position = folder, name, first_position
        self.remote = storage.is_url(folder)
        if self.remote:
            self.tmp = Path(tempfile.mkdtemp(prefix="adamae-shards-")) / f".{name}.tmp-{os.getpid()}"
        else:
            self.tmp = Path(folder) / f".{name}.tmp-{os.getpid()}"
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
        if self.remote:
            try:
                storage.upload(self.tmp, storage.join(str(self.folder), self.name))
            finally:
                self._remove_tmp()
        else:
            os.replace(self.tmp, Path(self.folder) / self.name)
            storage._fsync_dir(Path(self.folder))
        return entry

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        self.tmp.unlink(missing_ok=True)
        if self.remote:
            self.tmp.parent.rmdir()


def write_manifest(folder: Path | str, manifest: dict[str, Any], name: str = MANIFEST) -> None:
    storage.write_bytes_atomic(storage.join(str(folder), name), json.dumps(manifest, indent=1).encode())


def verify_shard(folder: Path | str, entry: dict[str, Any]) -> bool:
    location = storage.join(str(folder), entry["name"])
    return storage.size(location) == entry["bytes"] and storage.sha256(location) == entry["sha256"]


# -- the whole job -------------------------------------------------------------------------------------------


Location = Path | str  # a local path, or a URL (s3://, gs://, http(s)://) read and written through fsspec


def load_records(
    src: Location, root: Location | None, fmt: str
) -> tuple[list[Record], Location, dict[str, Path] | dict[str, str] | None]:
    """Records, the root their paths are relative to, and a stem index when the format names videos by id."""
    if storage.is_url(src) or (root is not None and storage.is_url(root)):
        return _load_remote_records(str(src), None if root is None else str(root), fmt)
    src, root = Path(src), None if root is None else Path(root)
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


def _load_remote_records(src: str, root: str | None, fmt: str) -> tuple[list[Record], str, dict[str, str] | None]:
    """``load_records`` for a folder or annotation file in object storage (or an annotation file on the web)."""
    if storage.is_dir(src):
        records = records_of(storage.find(src, VIDEO_EXTENSIONS))
        if not records:
            raise FileNotFoundError(
                f"SRC {storage.redact(src)}: no video files found (looked for {', '.join(VIDEO_EXTENSIONS)})"
            )
        return records, src.rstrip("/"), None
    try:
        text = storage.read_text(src)
    except FileNotFoundError:
        raise FileNotFoundError(f"SRC {storage.redact(src)}: no such file or folder") from None
    records = parse_annotations(storage.redact(src), text, fmt)
    base = str(root or storage.parent(src))
    needs_index = any(r.alt_stem is not None or not Path(r.path).suffix for r in records)
    if not needs_index:
        return records, base, None
    if not storage.is_url(base):
        return records, base, {stem: str(path) for stem, path in index_stems(Path(base)).items()}
    index: dict[str, str] = {}
    for rel in storage.find(base, VIDEO_EXTENSIONS):
        index.setdefault(Path(rel).stem, storage.join(base, rel))
    return records, base, index


def _display(location: Location) -> str:
    """How a location is recorded in the manifest: an absolute local path, or the URL without secrets."""
    return storage.redact(str(location)) if storage.is_url(location) else str(Path(location).resolve())


class ShardJob:
    """The videos of a job in their seeded order, their labels, and what identifies the job in its manifest."""

    def __init__(
        self,
        src: Location,
        opts: ShardOptions,
        root: Location | None = None,
        fmt: str = "auto",
        label_map: dict[str, int] | None = None,
    ):
        self.opts = opts
        self.records, self.base, stems = load_records(src, root, fmt)
        self.remote = storage.is_url(self.base)
        # Stem → video, for formats that name videos by id: URLs in object storage, paths on disk.
        self.url_stems: dict[str, str] | None = None
        self.path_stems: dict[str, Path] | None = None
        if stems is not None and self.remote:
            self.url_stems = {k: str(v) for k, v in stems.items()}
        elif stems is not None:
            self.path_stems = {k: Path(v) for k, v in stems.items()}
        self.labels = build_label_map(self.records, label_map)
        self.order = list(range(len(self.records)))
        if opts.shuffle:
            random.Random(opts.seed).shuffle(self.order)
        self.identity: dict[str, Any] = {
            "source": _display(src),
            "root": _display(self.base),
            "format": fmt,
            "num_videos": len(self.records),
            "options": asdict(opts),
            "label_map": self.labels,  # --label-map or the sorted names: a resume must number labels alike
        }

    def video(self, position: int) -> tuple[int, int, str, dict[str, Any], dict[str, Any]]:
        """The worker job (``process_video``'s argument) of the video at ``position`` in the shuffled order."""
        index = self.order[position]
        record = self.records[index]
        if self.remote:
            path: Path | str | None = resolve_url(record, str(self.base), self.url_stems)
        else:
            path = resolve(record, Path(self.base), self.path_stems)
        meta = {
            "label": label_index(record.label, self.labels),
            "label_name": record.label if isinstance(record.label, str) else None,
            "source": record.path,
        }
        return position, index, str(path) if path is not None else "", meta, asdict(self.opts)

    def failure(self, position: int, reason: str, log: Callable[[str], None]) -> dict[str, Any]:
        """The manifest entry of a skipped video, reported through ``log`` as it always was."""
        record = self.records[self.order[position]]
        where = f" (line {record.line})" if record.line else ""
        log(f"adamae-shards: skipped {record.path}{where}: {reason}")
        return {"path": record.path, "line": record.line, "reason": reason, "position": position}


def default_log(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def build_shards(
    src: Location,
    out_dir: Location,
    opts: ShardOptions,
    *,
    root: Location | None = None,
    fmt: str = "auto",
    label_map: dict[str, int] | None = None,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole job; returns the final manifest. Bad videos are reported, never fatal."""
    log = log or default_log
    shard_job = ShardJob(src, opts, root, fmt, label_map)
    order, labels = shard_job.order, shard_job.labels
    storage.make_dirs(out_dir)

    manifest, redo = _start_manifest(out_dir, shard_job.identity, labels, resume, log)
    remove_stale_temporaries(out_dir, opts.prefix)
    shards: list[dict[str, Any]] = manifest["shards"]
    failures: list[dict[str, Any]] = manifest["failures"]
    next_position = _range_start(shards)
    failures[:] = [f for f in failures if f["position"] < next_position]  # the rest is done again
    done_positions = next_position - sum(s["records"][1] - s["records"][0] for s in redo)

    job = shard_job.video

    def fail(position: int, reason: str) -> dict[str, Any]:
        return shard_job.failure(position, reason, log)

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


def remove_stale_temporaries(out_dir: Location, prefix: str, names: Iterable[str] | None = None) -> None:
    """Half-written shards left by a killed run: every one of the job (``prefix``), or only those of the shards
    ``names`` (other processes may be writing the others). Local folders only: an object store never shows one."""
    if storage.is_url(out_dir):
        return
    patterns = [f".{prefix}-*.tar.tmp-*"] if names is None else [f".{name}.tmp-*" for name in names]
    for pattern in patterns:
        for stale in Path(out_dir).glob(pattern):
            stale.unlink(missing_ok=True)


def _range_start(shards: list[dict[str, Any]]) -> int:
    return max((s["records"][1] for s in shards), default=0)


def _full(sink: ShardSink, opts: ShardOptions) -> bool:
    return (opts.samples_per_shard is not None and sink.samples >= opts.samples_per_shard) or (
        opts.bytes_per_shard is not None and sink.nbytes >= opts.bytes_per_shard
    )


def _start_manifest(
    out_dir: Location,
    identity: dict[str, Any],
    labels: dict[str, int],
    resume: bool,
    log: Callable[[str], None],
    name: str = MANIFEST,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fresh manifest, or (``--resume``) the previous one with the shards that need re-making. ``name``: where
    in OUT_DIR it lives (a part of a job keeps its own, and shares the folder with the other parts' shards)."""
    path = storage.join(str(out_dir), name)
    shown = storage.redact(path)
    if not storage.exists(path):
        existing = storage.names(out_dir, "*.tar") if name == MANIFEST else []
        if existing:
            raise FileExistsError(
                f"{storage.redact(str(out_dir))} holds tar files ({existing[0]}, ...) but no {MANIFEST}: "
                "use an empty OUT_DIR"
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
        write_manifest(out_dir, manifest, name)
        return manifest, []
    if not resume:
        raise FileExistsError(f"{shown} exists: pass --resume to continue that job, or use an empty OUT_DIR")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{shown}: not valid JSON ({err}); remove OUT_DIR to start over") from None
    if "label_map" in identity and manifest.get("label_map") != identity["label_map"]:
        raise ValueError(
            f"--resume: the shards in {storage.redact(str(out_dir))} number labels with another map "
            f"({_label_map_difference(manifest.get('label_map') or {}, identity['label_map'])}): "
            f"pass the --label-map of that job (its map is in {shown})"
        )
    differing = [k for k in identity if manifest.get(k) != identity[k]]
    if differing:
        detail = "; ".join(f"{k}: was {manifest.get(k)!r}, now {identity[k]!r}" for k in differing)
        shown_dir = storage.redact(str(out_dir))
        raise ValueError(f"--resume: the job in {shown_dir} was made with other inputs or options ({detail})")
    redo = []
    for entry in manifest["shards"]:
        if not verify_shard(out_dir, entry):
            log(f"adamae-shards: {entry['name']} is missing or does not match its sha256: re-making it")
            redo.append(entry)
    manifest["complete"] = False
    kept = len(manifest["shards"]) - len(redo)
    log(f"adamae-shards: resuming {storage.redact(str(out_dir))}: {kept} shards verified, {len(redo)} to re-make")
    return manifest, redo


def _label_map_difference(before: dict[str, int], now: dict[str, int], shown: int = 3) -> str:
    """``class0: 2 there, 0 now; ...`` for the first labels the two maps number differently."""
    differing = sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
    parts = [f"{name!r}: {before.get(name, 'none')} there, {now.get(name, 'none')} now" for name in differing[:shown]]
    more = f"; {len(differing) - shown} more" if len(differing) > shown else ""
    return "; ".join(parts) + more


# -- command line ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``500MB``, ``1GiB``, ``2e9`` → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 1GiB, 2e9)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))
