"""The streaming input pipeline over tar shards (``data=shards``), and its exact-resume state.

Inside each DataLoader worker, one epoch is a WebDataset stage list (see ``EpochClips.stages``):

    shard urls → seeded shuffle (seed, epoch) → split by rank → split by worker → [drop shards known to
    hold no usable sample] → tar samples → choose the frame window → sample shuffle buffer
    → [skip what a resumed run consumed] → decode + augment + normalise → batches of ``B`` slots

Non-resampled mode reads every shard of the epoch on exactly one (rank, worker) and every sample of a
shard once: each sample is delivered exactly once per epoch across all ranks and workers. There is no
``with_epoch`` padding: the ranks' epochs differ in length, and each rank just streams on into its next
epoch, so every ``next()`` returns a full batch of ``B`` clips. ``resampled=true`` draws shards with
replacement instead (an infinite stream per worker).

Slots and positions. A worker batch covers ``B`` *slots* (samples read from the tars, corrupt or not);
corrupt samples are dropped and counted, and the main process re-chunks the valid clips into batches of
``B``. The main process knows for every clip which worker batch it came from, so its position in the
epoch is exact: slots consumed per worker, which worker's batch comes next, and how many of that
batch's clips were already handed out. The DataLoader visits workers round-robin, so a resumed epoch
skips each worker's consumed slots (after the shuffle buffer, reading but not decoding them) and lets the
workers that had already delivered in the current round emit an empty marker first: the resumed stream
is the uninterrupted one, clip for clip.

Unreadable shards. A shard that is not a tar archive, or whose tar stream breaks off (truncated, damaged),
is a shard-level failure, not a corrupt sample: its worker sends ``(url, reason, usable)`` with the
batch, where ``usable`` counts the complete samples before the damage. The rank remembers it for the
rest of the run, prints it once and counts it as one corrupt sample; later epochs (and resampled draws)
read only its ``usable`` samples and stop there, so it is never re-opened (``usable == 0``) or read up
to the damage again. The samples delivered from a shard are the same whether its damage is known yet
or not, so this knowledge never changes the stream; it is saved with the position all the same, so a
resumed run neither reports nor counts a shard twice.

A shard that cannot be opened or read (the storage fails after its retries, a file system hiccups, a ``pipe:``
command exits non-zero) is not damaged:
its worker sends ``(url, reason)``, the rank prints it, and the shard is skipped for the rest of that epoch only;
it is opened again the next time it comes, and nothing of it is remembered or saved.

DeepSpeed saves the client state of rank 0 only, so ``state_dict()`` gathers every rank's position
(a collective: every rank must call it, as the trainer does at each checkpoint) and each rank picks its
own on ``load_state_dict``. Per-rank positions, not one rank-independent batch count, because ranks
finish epochs at different times and skip different corrupt samples. With another number of ranks,
workers or batch size, a resume starts the epoch after the furthest one begun (no sample of a finished
epoch repeats). A resampled stream has no order to replay: it resumes on a fresh seed drawn from the
number of batches consumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import signal
import sys
import tarfile
import time
import warnings
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..base.collectives import all_gather, all_reduce
from ..base.pixels import normalized
from ..base.seeds import derive_seed
from . import storage
from .distribute import PARTS
from .sections import ShardData, check_repeated_aug
from .shards import MANIFEST
from .transforms import crop_resize, rand_augment_clip
from .video import VideoError, VideoReader, decode_jpeg, window_indices

RngFor = Callable[[str, str], np.random.Generator]  # (sample key, purpose) → a generator for that sample

STATE_VERSION = 1
FRAME_NAME = re.compile(r"^(\d{6})\.jpg$")
MAX_PRINTED_ERRORS = 20  # per worker and epoch; the counts are complete regardless


class CorruptDataError(RuntimeError):
    """Too large a share of the samples read so far could not be used."""


@dataclass
class ShardDataConfig:
    """What the loader needs: the ``data=shards`` section (whose defaults these are) and the model's clip size."""

    urls: str | Sequence[str]
    num_frames: int = 16
    img_size: tuple[int, int] = (224, 224)
    sampling_rate: int = ShardData.sampling_rate
    crop_scales: tuple[float, ...] = ShardData.crop_scales
    max_distort: int = ShardData.max_distort
    flip: bool = ShardData.flip
    shuffle_buffer: int = ShardData.shuffle_buffer
    shuffle_initial: int = ShardData.shuffle_initial
    workers: int = ShardData.workers
    prefetch: int = ShardData.prefetch
    resampled: bool = ShardData.resampled
    max_corrupt_fraction: float = ShardData.max_corrupt_fraction
    corrupt_check_after: int = ShardData.corrupt_check_after
    seed: int = ShardData.seed
    # timm RandAugment policy, the same for every frame of a clip (fine-tuning).
    rand_augment: str | None = ShardData.rand_augment
    # Repeated augmentation: each decoded window gives this many independently augmented views,
    # consecutive samples of a batch with the same label and key. ``batch_size`` counts views.
    repeated_aug: int = ShardData.repeated_aug

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        scales = self.crop_scales
        if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in scales):
            raise ValueError(
                f"data.crop_scales={list(scales)!r}: expected a non-empty list of crop sizes in (0, 1] "
                "(fractions of the short side), e.g. [1.0, 0.875]"
            )
        self.crop_scales = tuple(float(s) for s in scales)
        for name in ("max_distort", "shuffle_buffer", "shuffle_initial", "corrupt_check_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")
        if self.sampling_rate < 1:
            raise ValueError(f"data.sampling_rate must be >= 1, got {self.sampling_rate}")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            raise ValueError(f"data.max_corrupt_fraction must be in [0, 1), got {self.max_corrupt_fraction}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.repeated_aug < 1:
            raise ValueError(f"repeated_aug must be >= 1, got {self.repeated_aug}")


# -- where the shards are ------------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


# Read through fsspec, streaming with retries (``storage.RetryingReader``); http(s) and pipe: stay with webdataset.
OBJECT_STORE = ("s3://", "gs://", "gcs://")


def _object_store_urls(text: str) -> list[str] | None:
    """``data.urls`` in object storage: a manifest.json (its shards, in order), a folder (its manifest, else its
    ``*.tar``), or a brace pattern of shards. ``None`` when ``text`` is not an object-store URL."""
    if not text.startswith(OBJECT_STORE):
        return None
    shown = storage.redact(text)
    try:
        if text.endswith(".json"):
            return _manifest_shards(text, storage.read_text(text), storage.parent(text))
        if not text.endswith(".tar") and "{" not in text and storage.is_dir(text):
            manifest = storage.join(text, MANIFEST)
            if storage.exists(manifest):
                return _manifest_shards(manifest, storage.read_text(manifest), text.rstrip("/"))
            if storage.exists(storage.join(text, PARTS)):
                raise ValueError(_unmerged(shown))
            names = storage.names(text, "*.tar")
            if not names:
                raise ValueError(f"data.urls={shown}: no .tar shards and no {MANIFEST} in that folder")
            return [storage.join(text, name) for name in names]
        if "{" not in text and not storage.exists(text):
            storage.check_bucket(text)
            raise FileNotFoundError(text)
    except FileNotFoundError as err:
        detail = storage.redact(str(err))
        raise ValueError(f"data.urls={shown}: not found" + (f" ({detail})" if detail != shown else "")) from None
    except storage.StorageError as err:
        raise ValueError(f"data.urls={shown}: {str(err).removeprefix(shown + ': ')}") from None
    return list(braceexpand.braceexpand(text))


def _unmerged(folder: str) -> str:
    return (
        f"data.urls={folder}: has {PARTS}/ from adamae-shards --part but no {MANIFEST}: run "
        f"`adamae-shards merge {folder}` first"
    )


def _manifest_shards(where: str, text: str, folder: str) -> list[str]:
    shown = storage.redact(where)
    try:
        manifest = json.loads(text)
        names = [s["name"] for s in manifest["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"data.urls={shown}: not an adamae-shards manifest ({err})") from None
    if not manifest.get("complete", False):
        warnings.warn(f"{shown}: the shard job is not complete (adamae-shards --resume finishes it)", stacklevel=3)
    if not names:
        raise ValueError(f"data.urls={shown}: the manifest lists no shards")
    return [storage.join(folder, name) for name in names]


def shard_urls(urls: str | Sequence[str]) -> list[str]:
    """``data.urls`` → shard list: a brace pattern (``/d/shard-{000000..000009}.tar``), a list, a folder
    (its ``manifest.json`` order, else its ``*.tar`` sorted) or a ``manifest.json``; local paths, ``s3://`` and
    ``gs://`` URLs (streamed through fsspec, with retries), ``http(s)://`` URLs and ``pipe:`` commands. Local
    shards must exist."""
    if urls is None or urls == "" or urls == []:
        raise ValueError(
            "data.urls is required for data=shards: a brace pattern, a list, a folder of shards "
            "or a manifest.json (made by adamae-shards)"
        )
    if isinstance(urls, (list, tuple)):
        expanded = [u for item in urls for u in shard_urls(item)]
    elif (remote := _object_store_urls(str(urls))) is not None:
        return remote
    else:
        text = str(urls)
        path = Path(text)
        if not _is_remote(text) and path.is_dir():
            manifest = path / MANIFEST
            if manifest.is_file():
                return shard_urls(str(manifest))
            if (path / PARTS).is_dir():
                raise ValueError(_unmerged(text))
            expanded = sorted(str(p) for p in path.glob("*.tar"))
            if not expanded:
                raise ValueError(f"data.urls={text}: no .tar shards and no {MANIFEST} in that folder")
        elif not _is_remote(text) and path.suffix == ".json":
            if not path.is_file():
                raise ValueError(f"data.urls={text}: manifest file not found")
            try:
                manifest = json.loads(path.read_text())
                names = [s["name"] for s in manifest["shards"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"data.urls={text}: not an adamae-shards manifest ({err})") from None
            if not manifest.get("complete", False):
                warnings.warn(
                    f"{text}: the shard job is not complete (adamae-shards --resume finishes it)", stacklevel=2
                )
            if not names:
                raise ValueError(f"data.urls={text}: the manifest lists no shards")
            expanded = [str(path.parent / name) for name in names]
        else:
            expanded = list(braceexpand.braceexpand(text))
    missing = [u for u in expanded if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise ValueError(f"data.urls: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return expanded


# -- stages (each maps an iterator to an iterator) -------------------------------------------------------------


def _seed(*parts: int | str) -> list[int]:
    """A numpy SeedSequence entropy list from ints and strings (strings by CRC32: stable across processes)."""
    return [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]


def shuffled_shards(urls: list[str], seed: int, epoch: int) -> wds.SimpleShardList:
    """This epoch's shard order, the same on every rank and worker (they split it afterwards)."""
    order = list(urls)
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    return wds.SimpleShardList(order)  # yields {"url": ...} in this order


def take_every(src: Iterable, index: int, count: int) -> Iterator:
    """Items ``index, index + count, …``: the split by rank, then by worker."""
    return islice(src, index, None, count)


def usable_shards(
    src: Iterable[dict[str, Any]], known: Mapping[str, int], shard_count: int
) -> Iterator[dict[str, Any]]:
    """Drops the shards known to hold no usable sample; ends an endless (resampled) draw once every one of
    the ``shard_count`` shards is known to be unusable, instead of drawing forever."""
    for source in src:
        if known.get(source["url"]) != 0:
            yield source
        elif sum(1 for usable in known.values() if usable == 0) >= shard_count:
            return


def shard_samples(
    src: Iterable[dict[str, Any]],
    known: dict[str, int],
    on_unreadable: Callable[[str, str, int], None],
    on_member_error: Callable[[Exception], bool],
    on_read_error: Callable[[str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """``{url}`` → the shard's raw samples ``{__key__, __url__, json, mp4 | mjpeg | ...}``.

    A shard whose tar stream is damaged (not a tar, truncated) yields the complete samples before the damage, sets
    ``known[url]`` to their number and calls ``on_unreadable(url, reason, usable)``, once. A shard already
    in ``known`` is read for that many samples only, never up to the damage again. A shard that cannot be opened
    or read (storage or network failing, after its retries) ends there for this pass, ``on_read_error(url,
    reason)`` (without one: ``on_unreadable``), and is tried again the next time it comes.
    """
    for source in src:
        url = source["url"]
        damage: list[tuple[Exception, int]] = []
        files = _tar_files(url, damage)
        samples: Iterator[dict[str, Any]] = group_by_keys(files, handler=on_member_error)
        if url in known:
            samples = islice(samples, known[url])
        usable = 0
        try:
            for sample in samples:
                if damage:  # the sample being read when the damage came: incomplete
                    break
                usable += 1
                yield sample
        finally:
            files.close()
        if damage:
            err, files_read = damage[0]
            if not _is_format_damage(err):
                if on_read_error is None:
                    on_unreadable(url, _read_error_reason(err, files_read), usable)
                else:
                    on_read_error(url, _read_error_reason(err, files_read))
                continue
            known[url] = usable
            on_unreadable(url, _damage_reason(err, files_read), usable)


def every_sample_once(
    urls: Iterable[str],
    on_unreadable: Callable[[str, str, int], None],
    on_member_error: Callable[[Exception], bool],
    attempts: int = 3,
    pause_s: float = 1.0,
) -> Iterator[dict[str, Any]]:
    """One pass over ``urls`` (evaluation, pictures): each shard's raw samples in stored order, each once. A shard
    that cannot be read to its end (storage failing, a ``pipe:`` command exiting non-zero) is opened again, up
    to ``attempts`` times in all with a growing pause, and continued after the samples it already gave, so a
    passing hiccup does not change what is evaluated; after that it goes to ``on_unreadable`` like a damaged one."""
    failed: list[str] = []

    def read_failed(url: str, reason: str) -> None:
        failed.append(reason)

    for url in urls:
        given = 0
        for attempt in range(1, attempts + 1):
            failed.clear()
            samples = shard_samples([{"url": url}], {}, on_unreadable, on_member_error, on_read_error=read_failed)
            for sample in islice(samples, given, None):  # the samples given before are read again, not yielded
                given += 1
                yield sample
            if not failed:
                break
            if attempt == attempts:
                on_unreadable(url, f"could not be read in {attempts} tries ({failed[0]})", given)
                break
            print(
                f"[adamae] data: could not read shard {url} ({failed[0]}): opening it again ({attempt + 1} of "
                f"{attempts}) after its first {given} samples",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(pause_s * attempt)


def _tar_files(url: str, damage: list[tuple[Exception, int]]) -> Generator[dict[str, Any], None, None]:
    """The shard's files ``{fname, data, __url__}``. An error that breaks the tar stream ends them and goes
    into ``damage`` with the number of files read before it, instead of being retried member by member."""
    files, stream = 0, None
    try:
        stream = storage.open_read(url) if url.startswith(OBJECT_STORE) else wds.gopen(url)
        for member in tar_file_iterator(stream):  # re-raises: the stream cannot be trusted past an error
            member["__url__"] = url
            files += 1
            yield member
    except Exception as err:
        damage.append((_command_failure(stream) or err, files))
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):  # a pipe: closed before its command wrote all, it exits non-zero
                stream.close()


def _command_failure(stream: Any) -> OSError | None:
    """For a ``pipe:`` shard whose stream broke off: the command's failure (a copy tool that lost its connection
    writes a short or empty stream and exits non-zero), which is a read error, not damage of the shard itself.
    The rest of the output is read first, so the command is never stopped by a closed pipe and its own exit
    status tells."""
    proc = getattr(stream, "proc", None)  # webdataset's Pipe
    if proc is None or proc.stdout is None:
        return None
    with contextlib.suppress(Exception):
        while proc.stdout.read(1 << 20):
            pass
    status = proc.wait()
    return OSError(f"the command exited with status {status}") if status != 0 else None


def _is_format_damage(err: Exception) -> bool:
    """The bytes themselves are bad (reading them again gives the same), as opposed to an open or read failure."""
    return isinstance(err, (tarfile.TarError, EOFError))


def _error_message(err: Exception) -> str:
    return " ".join(str(err).split(" @ <")[0].split())[:200]  # webdataset appends " @ <stream>"


def _read_error_reason(err: Exception, files: int) -> str:
    where = f" after {files} files" if files else ""
    return f"{type(err).__name__}{where}: {_error_message(err)}"


def _damage_reason(err: Exception, files: int) -> str:
    message = _error_message(err)
    if files == 0:
        if isinstance(err, tarfile.ReadError):
            return f"not a tar archive ({message})"
        return f"cannot be read ({type(err).__name__}: {message})"
    return f"truncated or damaged after {files} files ({message})"


def choose_window(
    src: Iterable[dict[str, Any]], num_frames: int, sampling_rate: int, rng_for: RngFor
) -> Iterator[dict[str, Any]]:
    """Raw tar sample → ``{key, url, label, mp4 | jpgs, indices}`` or ``{key, url, error}``.

    Only the JSON is parsed here (never a pickle); for JPEG samples the frames outside the window are
    dropped before the shuffle buffer, so the buffer holds ``num_frames`` JPEGs per sample, not the video.
    """
    for sample in src:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            if "json" not in sample:
                raise VideoError(f"no .json member (members: {sorted(k for k in sample if not k.startswith('__'))})")
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise VideoError(".json is not an object")
            count = meta.get("num_frames")
            if not isinstance(count, int) or count < 1:
                raise VideoError(f".json num_frames must be a positive integer, got {count!r}")
            indices = window_indices(count, num_frames, sampling_rate, rng_for(key, "window"))
            item = {"key": key, "url": url, "label": int(meta.get("label", -1)), "indices": indices}
            if "mp4" in sample:
                item["mp4"] = sample["mp4"]
            elif "mjpeg" in sample:
                item["jpgs"] = mjpeg_frames(sample["mjpeg"], meta.get("frame_offsets"), count, indices)
            else:  # one member per frame, the usual WebDataset layout of other tools
                frames = {int(m.group(1)): v for k, v in sample.items() if (m := FRAME_NAME.match(k))}
                if not frames:
                    raise VideoError(
                        f"no .mp4, .mjpeg or NNNNNN.jpg members (members: "
                        f"{sorted(k for k in sample if not k.startswith('__'))})"
                    )
                lacking = sorted({int(i) for i in indices} - frames.keys())
                if lacking:
                    raise VideoError(f"frame {lacking[0]:06d}.jpg is missing")
                item["jpgs"] = [frames[int(i)] for i in indices]
            yield item
        except Exception as err:  # a corrupt sample must never stop training: it is counted instead
            yield {"key": key, "url": url, "error": f"{type(err).__name__}: {err}"[:300]}


def mjpeg_frames(blob: bytes, offsets: Any, count: int, indices: np.ndarray) -> list[bytes]:
    """The JPEG images ``indices`` of a back-to-back MJPEG member, located by the JSON's offsets."""
    if (
        not isinstance(offsets, list)
        or len(offsets) != count + 1
        or offsets[0] != 0
        or offsets[-1] != len(blob)
        or any(b <= a for a, b in pairwise(offsets))
    ):
        raise VideoError(f".json frame_offsets do not describe the {len(blob)}-byte .mjpeg member of {count} frames")
    return [blob[offsets[i] : offsets[i + 1]] for i in indices]


def decode_clip(src: Iterable[dict[str, Any]], cfg: ShardDataConfig, rng_for: RngFor) -> Iterator[dict[str, Any]]:
    """Window → ``{key, label, views: [video [3, T, H, W] uint8] * repeated_aug}``, or the sample with an ``error``.

    The window is decoded once; each view draws its own crop (and RandAugment seed) from the sample's generators
    in turn, so the first view is the clip ``repeated_aug=1`` gives and the views differ from each other."""
    for item in src:
        if "error" in item:
            yield item
            continue
        try:
            if "mp4" in item:
                with VideoReader(item["mp4"]) as reader:
                    frames = reader.read_indices(item["indices"], skip_disposable=True)
            else:
                frames = np.stack([decode_jpeg(data) for data in item["jpgs"]])
            crop_rng = rng_for(item["key"], "augment")
            augment_rng = rng_for(item["key"], "rand_augment") if cfg.rand_augment else None
            views = []
            for _ in range(cfg.repeated_aug):
                # uint8; normalised into the batch
                video = crop_resize(frames, cfg.img_size, cfg.crop_scales, cfg.max_distort, cfg.flip, crop_rng)
                if cfg.rand_augment and augment_rng is not None:
                    video = rand_augment_clip(video, cfg.rand_augment, int(augment_rng.integers(2**31)))
                views.append(video)
            yield {"key": item["key"], "label": item["label"], "views": views}
        except Exception as err:  # bad bytes: counted, never fatal on their own
            yield {"key": item["key"], "url": item["url"], "error": f"{type(err).__name__}: {err}"[:300]}


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: SIGTERM and SIGINT are ignored. SLURM, ``scancel`` and Ctrl-C signal the whole
    process group; a worker that died of it would fail the main process's next batch before it could checkpoint.
    The main process stops the workers itself when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- one epoch of one rank, as seen by a DataLoader worker ---------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a rank stands inside an epoch (all counts in slots, i.e. samples read from the tars)."""

    consumed: list[int]  # per worker: slots of its batches fully handed out
    next_worker: int = 0  # whose batch comes next in the DataLoader's round-robin
    offset: int = 0  # clips of that batch already handed out

    @classmethod
    def start(cls, workers: int) -> ResumePoint:
        return cls([0] * workers)


class EpochClips(IterableDataset):
    """One rank's epoch (or, resampled, its endless stream) of worker batches:
    ``{"worker", "slots", "corrupt", "video" [b, 3, T, H, W], "label", "key"}`` or a marker ``{"worker"}``.
    A worker batch reads ``batch_size / repeated_aug`` slots, so it holds up to ``batch_size`` views."""

    def __init__(
        self,
        cfg: ShardDataConfig,
        urls: list[str],
        batch_size: int,
        rank: int,
        world_size: int,
        epoch: int,
        resume: ResumePoint | None,
        unreadable: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.cfg, self.urls, self.batch_size = cfg, urls, batch_size
        self.rank, self.world_size, self.epoch, self.resume = rank, world_size, epoch, resume
        self.known = dict(unreadable or {})  # unreadable shard → its usable samples, as this worker knows
        self.tar_errors: list[str] = []
        self.found: list[tuple[str, str, int]] = []  # shards found unreadable since the last batch
        self.read_errors: list[tuple[str, str]] = []  # shards that failed to read since the last batch

    def _rng_for(self, worker: int) -> RngFor:
        cfg, epoch = self.cfg, self.epoch
        if cfg.resampled:
            # A resampled stream can hold a sample twice: seed by its position in this worker's stream.
            counter = iter(range(sys.maxsize))
            return lambda key, purpose: np.random.default_rng(
                _seed(cfg.seed, epoch, self.rank, worker, next(counter), purpose)
            )
        # Exactly-once epochs: the clip of a sample depends on (seed, epoch, key) only, never on the
        # rank or worker that reads it or on skipping.
        return lambda key, purpose: np.random.default_rng(_seed(cfg.seed, epoch, key, purpose))

    def _on_tar_error(self, exn: Exception) -> bool:
        self.tar_errors.append(f"{type(exn).__name__}: {exn}"[:300])
        return True  # go on with the next sample / shard

    def _on_unreadable(self, url: str, reason: str, usable: int) -> None:
        self.found.append((url, reason, usable))

    def _on_read_error(self, url: str, reason: str) -> None:
        self.read_errors.append((url, reason))

    def stages(self, worker: int, workers: int) -> list:
        cfg = self.cfg
        if cfg.resampled:
            source = [
                wds.ResampledShards(
                    self.urls,
                    seed=derive_seed(cfg.seed, self.epoch),
                    deterministic=True,
                    worker_seed=lambda: self.rank * 10_007 + worker,
                )
            ]
            # an endless stream of shard urls drawn with replacement, its own for each (rank, worker)
        else:
            source = [
                shuffled_shards(self.urls, cfg.seed, self.epoch),  # every shard once, in this epoch's order
                lambda src: take_every(src, self.rank, self.world_size),  # this rank's shards
                lambda src: take_every(src, worker, workers),  # this worker's shards
            ]
        window_rng = self._rng_for(worker)
        augment_rng = self._rng_for(worker)
        shard_count = len(set(self.urls))
        stages = source + [
            lambda src: usable_shards(src, self.known, shard_count),
            # raw samples {__key__, json, mp4 | mjpeg}; a broken tar stream ends its shard, reported once
            lambda src: shard_samples(src, self.known, self._on_unreadable, self._on_tar_error, self._on_read_error),
            lambda src: choose_window(src, cfg.num_frames, cfg.sampling_rate, window_rng),  # compact windows
        ]
        if cfg.shuffle_buffer > 1:
            rng = random.Random(zlib.crc32(f"{cfg.seed}/{self.epoch}/{self.rank}/{worker}".encode()))
            stages.append(wds.shuffle(cfg.shuffle_buffer, min(cfg.shuffle_initial, cfg.shuffle_buffer), rng=rng))
        skip = self.resume.consumed[worker] if self.resume is not None else 0
        if skip:
            stages.append(lambda src: islice(src, skip, None))  # what the interrupted run already used
        stages.append(lambda src: decode_clip(src, cfg, augment_rng))  # clips [3, T, H, W]
        return stages

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.resume is not None and worker < self.resume.next_worker:
            yield {"worker": worker}  # this worker already delivered in the interrupted round
        samples = iter(wds.DataPipeline(*self.stages(worker, workers)))
        printed = 0
        while True:
            slots = list(islice(samples, self.batch_size // self.cfg.repeated_aug))
            errors, self.tar_errors = self.tar_errors, []
            unreadable, self.found = self.found, []
            read_errors, self.read_errors = self.read_errors, []
            if not slots and not errors and not unreadable and not read_errors:
                return
            good = [s for s in slots if "views" in s]
            bad = [f"{s.get('url', '?')} {s['key']}: {s['error']}" for s in slots if "error" in s] + errors
            for line in bad:
                if printed < MAX_PRINTED_ERRORS:
                    print(
                        f"[adamae data] rank {self.rank} worker {worker}: skipped corrupt sample {line}",
                        file=sys.stderr,
                        flush=True,
                    )
                printed += 1
            batch: dict[str, Any] = {
                "worker": worker,
                "slots": len(slots),
                "corrupt": len(bad),
                "tar_errors": len(errors),
                "unreadable": unreadable,  # counted and printed once per rank by the main process
                "read_errors": read_errors,  # printed by the main process; the shard is read again next time
            }
            if good:
                batch["video"] = _normalized_batch([view for s in good for view in s["views"]])
                batch["label"] = torch.tensor([s["label"] for s in good for _ in s["views"]], dtype=torch.long)
                batch["key"] = [s["key"] for s in good for _ in s["views"]]
            yield batch


def _normalized_batch(clips: list[torch.Tensor]) -> torch.Tensor:
    """uint8 clips → one float batch, normalised in place; in a worker it lives in shared memory, so
    sending it to the training process copies nothing."""
    shape = (len(clips), *clips[0].shape)
    if get_worker_info() is not None:  # as torch's default_collate allocates its output in a worker
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 4)
        video = torch.empty(0, dtype=torch.float32).new(storage).view(shape)
    else:
        video = torch.empty(shape, dtype=torch.float32)
    for slot, clip in zip(video, clips, strict=True):
        normalized(clip, out=slot)
    return video


# -- the rank's infinite iterator: re-chunking, epochs, state ------------------------------------------------------


@dataclass
class _Current:
    """The worker batch being handed out."""

    batch: dict[str, Any]
    epoch: int
    taken: int = 0

    @property
    def valid(self) -> int:
        return len(self.batch.get("key", ()))


class ShardClips:
    """Infinite batches ``{"video": [B, 3, T, H, W] normalised, "label": [B], "epoch": [B], "key": [str]}``
    for one rank; ``state_dict``/``load_state_dict`` resume it exactly (JSON-able, no pickles). With
    ``repeated_aug = r``, ``B`` counts views: ``B / r`` clips, each clip's ``r`` views next to each other (worker
    batches hold whole clips and ``B`` is a multiple of ``r``, so a clip's views never straddle two batches)."""

    def __init__(self, cfg: ShardDataConfig, batch_size: int, rank: int = 0, world_size: int = 1):
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.urls = shard_urls(cfg.urls)
        check_repeated_aug("data.repeated_aug", cfg.repeated_aug, batch_size)
        if not cfg.resampled and len(self.urls) < world_size:
            raise ValueError(
                f"data.urls: {len(self.urls)} shards for {world_size} ranks; every rank needs at least "
                "one shard per epoch: make more, smaller shards (adamae-shards --samples-per-shard) "
                "or set data.resampled=true"
            )
        self.workers = max(1, cfg.workers)  # the in-process loader (workers=0) is one worker
        self.epoch = 0
        self.point = ResumePoint.start(self.workers)
        self.batches = 0  # handed to the trainer: the same count on every rank
        self.seen = 0  # slots read, on this rank
        self.corrupt = 0
        self.unreadable: dict[str, int] = {}  # shards found unreadable on this rank → their usable samples
        self._reasons: dict[str, str] = {}
        self._loader: Iterator | None = None
        self._current: _Current | None = None
        self._drop = 0  # clips of the first batch from point.next_worker already used before a resume
        self._epoch_slots = 0

    # -- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self) -> ShardClips:
        return self

    def _start_epoch(self, resume: ResumePoint | None) -> None:
        if all(self.unreadable.get(url) == 0 for url in self.urls):
            raise CorruptDataError(
                f"data: none of the {len(self.urls)} shards can be read (e.g. {self._describe(self.urls[0])}); "
                "re-make them with adamae-shards"
            )
        dataset = EpochClips(
            self.cfg, self.urls, self.batch_size, self.rank, self.world_size, self.epoch, resume, self.unreadable
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.workers,
            prefetch_factor=self.cfg.prefetch if self.cfg.workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.cfg.seed),  # leaves the global torch RNG alone
            worker_init_fn=ignore_stop_signals,
        )
        self._loader = iter(loader)
        self._epoch_slots = 0

    def _next_worker_batch(self) -> _Current:
        if self._loader is None:
            self._start_epoch(None)
        assert self._loader is not None
        empty_epochs = 0
        while True:
            try:
                batch = next(self._loader)
            except StopIteration:
                if self._epoch_slots == 0:
                    empty_epochs += 1
                    if empty_epochs >= 2:
                        raise RuntimeError(
                            f"data: rank {self.rank} read no samples in two epochs from "
                            f"{len(self.urls)} shards ({self.urls[0]}, ...)"
                        ) from None
                self.epoch += 1
                self.point = ResumePoint.start(self.workers)
                self._drop = 0
                self._start_epoch(None)
                continue
            if "slots" not in batch:  # a resume marker
                continue
            self._epoch_slots += batch["slots"]
            self._count(batch)
            current = _Current(batch, self.epoch)
            if self._drop:
                current.taken = min(self._drop, current.valid)
                self._drop = 0
            self.point.next_worker, self.point.offset = batch["worker"], current.taken
            return current

    def _count(self, batch: Mapping[str, Any]) -> None:
        # An unreadable shard counts as one corrupt sample, once per rank: another worker, a later epoch or a
        # resumed run that meets it again does not count it again.
        new = [(url, reason, usable) for url, reason, usable in batch["unreadable"] if url not in self.unreadable]
        for url, reason, usable in new:
            self.unreadable[url], self._reasons[url] = int(usable), reason
        self.seen += batch["slots"] + batch["tar_errors"] + len(new)
        self.corrupt += batch["corrupt"] + len(new)
        limit = self.cfg.max_corrupt_fraction
        if self.seen >= self.cfg.corrupt_check_after and self.corrupt > limit * self.seen:
            named = [url for url, _, _ in new] or list(self.unreadable)[:3]
            shards = "".join(f", including the unreadable shard {self._describe(url)}" for url in named)
            raise CorruptDataError(
                f"data: {self.corrupt} of {self.seen} samples read on rank {self.rank} were corrupt "
                f"({self.corrupt / self.seen:.1%} > data.max_corrupt_fraction={limit}){shards}; the reasons are "
                f"on stderr. Re-make the shards (adamae-shards --resume re-checks their sha256) or raise the limit"
            )
        for url, reason, usable in new:
            kept = f"; its first {usable} samples, complete before that, are used" if usable else ""
            print(f"[adamae] data: skipping unreadable shard {url}: {reason}{kept}", file=sys.stderr, flush=True)
        for url, reason in batch.get("read_errors", ()):
            print(
                f"[adamae] data: could not read shard {url} ({reason}): skipped in epoch {self.epoch}, read again "
                "in the next",
                file=sys.stderr,
                flush=True,
            )

    def _describe(self, url: str) -> str:
        return f"{url} ({self._reasons[url]})" if url in self._reasons else url

    def _finish(self, current: _Current) -> None:
        worker = current.batch["worker"]
        self.point.consumed[worker] += current.batch["slots"]
        self.point.next_worker, self.point.offset = (worker + 1) % self.workers, 0

    def __next__(self) -> dict[str, Any]:
        parts: list[tuple[dict[str, Any], int, int, int]] = []
        need = self.batch_size
        while need:
            if self._current is None:
                self._current = self._next_worker_batch()
            current = self._current
            take = min(need, current.valid - current.taken)
            if take:
                parts.append((current.batch, current.taken, current.taken + take, current.epoch))
                current.taken += take
                need -= take
                self.point.offset = current.taken
            if current.taken == current.valid:
                self._finish(current)
                self._current = None
        self.batches += 1
        join = (lambda xs: xs[0]) if len(parts) == 1 else torch.cat  # one worker batch: views, no copy
        return {
            "video": join([b["video"][i:j] for b, i, j, _ in parts]),
            "label": join([b["label"][i:j] for b, i, j, _ in parts]),
            "epoch": torch.tensor([e for _, i, j, e in parts for _ in range(i, j)], dtype=torch.long),
            "key": [k for b, i, j, _ in parts for k in b["key"][i:j]],
        }

    def close(self) -> None:
        self._loader = None  # the DataLoader iterator shuts its workers down when collected

    # -- state -------------------------------------------------------------------------------------------------
    def _local_position(self) -> list[int]:
        p = self.point
        return [self.epoch, p.next_worker, p.offset, self.seen, self.corrupt, len(self.unreadable), *p.consumed]

    def _gathered_unreadable(self, counts: list[int]) -> list[dict[str, int]]:
        """Every rank's unreadable shards ``{url: usable samples}`` (``counts`` of them), sent as (url index,
        usable) pairs."""
        longest = max(counts)
        if longest == 0:
            return [{} for _ in counts]
        pairs = [v for url, usable in self.unreadable.items() for v in (self.urls.index(url), usable)]
        rows = all_gather(pairs + [-1] * (2 * longest - len(pairs)))
        return [{self.urls[i]: usable for i, usable in zip(row[::2], row[1::2], strict=True) if i >= 0} for row in rows]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state holding every rank's position. Collective when distributed: call it on every rank."""
        rows = all_gather(self._local_position())
        unreadable = self._gathered_unreadable([r[5] for r in rows])
        ranks = [
            {
                "epoch": r[0],
                "next_worker": r[1],
                "offset": r[2],
                "seen": r[3],
                "corrupt": r[4],
                "consumed": r[6:],
                "unreadable": shards,
            }
            for r, shards in zip(rows, unreadable, strict=True)
        ]
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "repeated_aug": self.cfg.repeated_aug,
            "resampled": self.cfg.resampled,
            "seed": self.cfg.seed,
            "stream": self._stream_fingerprint(),
            "ranks": ranks,
        }

    def _stream_fingerprint(self) -> dict[str, Any]:
        """What fixes the order of the samples besides the layout: the shard list, the seed and the shuffle."""
        return {
            "shards": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16],
            "num_shards": len(self.urls),
            "seed": self.cfg.seed,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "shuffle_initial": self.cfg.shuffle_initial,
        }

    def _stream_changes(self, state: Mapping[str, Any]) -> list[str]:
        """How the saved stream differs from this one, e.g. ``["shards 4->5", "seed 0->1"]`` (a state saved before
        the fingerprint existed: its seed only)."""
        saved = state.get("stream", {"seed": state.get("seed")})
        now = self._stream_fingerprint()
        changes = []
        if "shards" in saved and saved["shards"] != now["shards"]:
            before, after = saved["num_shards"], now["num_shards"]
            changes.append(f"shards {before}->{after}" if before != after else f"another list of {after} shards")
        for name in ("seed", "shuffle_buffer", "shuffle_initial"):
            if name in saved and saved[name] != now[name]:
                changes.append(f"{name} {saved[name]}->{now[name]}")
        return changes

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (saved by any rank, e.g. rank 0) left this rank."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}: expected {STATE_VERSION}")
        self.close()
        self._current = None
        self.batches = int(state["batches"])
        layout = {
            "world": (state["world_size"], self.world_size),
            "workers": (state["workers"], self.workers),
            "batch": (state["batch_size"], self.batch_size),
            "repeated_aug": (state.get("repeated_aug", 1), self.cfg.repeated_aug),
            "resampled": (state["resampled"], self.cfg.resampled),
        }
        changes = [f"{name} {was}->{now}" for name, (was, now) in layout.items() if was != now]
        changes += self._stream_changes(state)
        same_layout = not changes and len(state["ranks"]) == self.world_size
        # The shards found unreadable so far (older states have none): this rank's own, or with another
        # layout every rank's. They change no stream, only what is reported and counted again. With another
        # shard list, none: a shard of the same name may have been made again since (adamae-shards --resume).
        found = [state["ranks"][self.rank]] if same_layout else state["ranks"]
        same_shards = state.get("stream", {}).get("shards", "") in ("", self._stream_fingerprint()["shards"])
        self.unreadable = {
            url: int(usable)
            for rank in found
            for url, usable in rank.get("unreadable", {}).items()
            if url in self.urls and same_shards
        }
        if self.cfg.resampled:
            # An endless draw with replacement: a fresh stream seeded by the resume point, not a replay.
            own = state["ranks"][self.rank] if same_layout else state["ranks"][0]
            self.seen, self.corrupt = int(own["seen"]), int(own["corrupt"])
            self.epoch = self.batches + 1
            self.point = ResumePoint.start(self.workers)
            self._drop = 0
            return
        if not same_layout:
            # Another number of ranks, workers or batch size, or another shard list, seed or shuffle: positions do
            # not carry over. Start the next epoch after the furthest one any rank had begun, so no clip of a
            # finished epoch repeats.
            self.epoch = max(int(r["epoch"]) for r in state["ranks"]) + 1
            self.point, self._drop = ResumePoint.start(self.workers), 0
            warnings.warn(
                f"data: resuming with another layout or stream ({', '.join(changes)}): "
                f"starting epoch {self.epoch} from its beginning",
                stacklevel=2,
            )
            return
        own = state["ranks"][self.rank]
        self.epoch = int(own["epoch"])
        self.seen, self.corrupt = int(own["seen"]), int(own["corrupt"])
        self.point = ResumePoint([int(c) for c in own["consumed"]], int(own["next_worker"]), int(own["offset"]))
        self._drop = self.point.offset
        resume = ResumePoint(list(self.point.consumed), self.point.next_worker, self.point.offset)
        self._start_epoch(resume)

    def metrics(self) -> dict[str, float]:
        """Corrupt samples skipped so far, summed over ranks (collective when distributed)."""
        seen, corrupt = all_reduce([self.seen, self.corrupt], "sum", torch.long)
        return {"data_corrupt": corrupt, "data_corrupt_fraction": corrupt / max(seen, 1), "data_epoch": self.epoch}
