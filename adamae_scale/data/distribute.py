"""``adamae-shards`` over many machines: Ray tasks (``--distributor ray``), or SLURM array parts
(``--part I/N``) joined by ``adamae-shards merge OUT_DIR``.

Both give every shard a fixed set of videos: shard ``i`` takes the videos at positions ``[i·k, (i+1)·k)`` of
the job's seeded order, ``k`` = ``--samples-per-shard`` (a video split into clips adds several samples, a
skipped one none). So which machine makes a shard never changes its bytes, and a shard is one task: it
is converted by one process and written atomically into OUT_DIR, which every machine must reach (a shared
file system or object storage). The process pool (the default) fills shards up to their targets instead;
both store the same samples.

- Ray: the driver submits one task per shard (a worker that dies is retried ``TASK_RETRIES`` times, then
  once more with every video in a child process of its own, so a video that crashes its decoder is
  reported as with the pool) and rewrites ``manifest.json`` after every finished shard.
- Parts: part ``I`` of ``N`` makes the shards whose index ≡ I (mod N), ``--workers`` at a time, and keeps
  its own manifest ``parts/part-I-of-N.json``; ``merge`` checks that every part finished and every shard is
  there, and writes the one ``manifest.json``.

``--resume`` works as with the pool: verified shards are kept, the others are made again.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from . import storage
from .shards import (
    MANIFEST,
    Location,
    ShardJob,
    ShardOptions,
    ShardSink,
    _run_alone,
    _start_manifest,
    default_log,
    ordered_map,
    process_video,
    remove_stale_temporaries,
    tool_version,
    verify_shard,
    write_manifest,
)

LAYOUT = "videos_per_shard"  # recorded in the manifest of a job with fixed shards
TASK_RETRIES = 3
PARTS = "parts"
PART_NAME = re.compile(r"^part-(\d+)-of-(\d+)\.json$")
DISTRIBUTORS = ("pool", "ray")


class IncompleteJob(RuntimeError):
    """Some shards could not be made in this run (each was reported); ``--resume`` makes them."""


@dataclass(frozen=True)
class ShardTask:
    """One shard: its index, its name and the ``process_video`` jobs of its videos."""

    index: int
    name: str
    start: int
    end: int
    videos: list[tuple[int, int, str, dict[str, Any], dict[str, Any]]]


def check_fixed_layout(opts: ShardOptions) -> int:
    """Videos per shard of a distributed job."""
    if opts.bytes_per_shard is not None or opts.samples_per_shard is None:
        raise ValueError(
            "--distributor ray and --part give every shard a fixed number of videos: use --samples-per-shard "
            "without --bytes-per-shard"
        )
    return opts.samples_per_shard


def plan(job: ShardJob) -> list[tuple[int, int]]:
    """``(start, end)`` positions of each shard's videos."""
    per_shard = check_fixed_layout(job.opts)
    total = len(job.order)
    return [(start, min(start + per_shard, total)) for start in range(0, total, per_shard)]


def shard_task(job: ShardJob, index: int, span: tuple[int, int]) -> ShardTask:
    start, end = span
    name = f"{job.opts.prefix}-{index:06d}.tar"
    return ShardTask(index, name, start, end, [job.video(p) for p in range(start, end)])


def convert_shard(task: ShardTask, out_dir: str, isolate: bool = False) -> dict[str, Any]:
    """Make one shard (a Ray task or a pool job): ``{"index", "entry", "failed": [(position, reason)]}``.
    ``isolate``: each video in a child process of its own, so one that crashes its decoder is reported, not fatal."""
    if isolate:
        results: Iterator = (_run_alone(process_video, video) for video in task.videos)
    else:
        results = map(process_video, task.videos)
    sink = ShardSink(out_dir, task.name, task.start)
    failed: list[tuple[int, str]] = []
    try:
        for position, outcome in results:
            if isinstance(outcome, str):
                failed.append((position, outcome))
            else:
                for sample in outcome:
                    sink.add(sample)
        entry = sink.close(task.end)
    except BaseException:
        sink.abort()
        raise
    return {"index": task.index, "entry": entry, "failed": failed}


def _pool_job(job: tuple[int, ShardTask, str]) -> tuple[int, dict[str, Any]]:
    index, task, out_dir = job
    return index, convert_shard(task, out_dir)


# -- executors: each yields (task, result) or (task, one-line error) as shards finish ------------------------------


def pool_results(tasks: list[ShardTask], out_dir: str, workers: int) -> Iterator[tuple[ShardTask, Any]]:
    """Shards made ``workers`` at a time by local processes; a shard whose process died is made again with each
    video in its own process."""
    by_index = {task.index: task for task in tasks}
    for index, outcome in ordered_map(_pool_job, ((t.index, t, out_dir) for t in tasks), workers):
        task = by_index[index]
        if isinstance(outcome, str):  # the process died: find the video that kills it
            try:
                outcome = convert_shard(task, out_dir, isolate=True)
            except Exception as err:
                outcome = f"{type(err).__name__}: {storage.redact(str(err))}"[:300]
        yield task, outcome


def ray_results(
    tasks: list[ShardTask], out_dir: str, address: str | None, workers: int, log: Callable[[str], None]
) -> Iterator[tuple[ShardTask, Any]]:
    """Shards made as Ray tasks on the cluster at ``address`` (a new local one with ``workers`` CPUs when None)."""
    try:
        import ray
        from ray.exceptions import RayError, WorkerCrashedError
    except ImportError:
        raise ValueError("--distributor ray needs Ray: pip install 'adamae_scale[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=address,
                num_cpus=workers if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ValueError(f"--ray-address {address}: cannot connect to a Ray cluster ({err})") from None
    try:
        convert = ray.remote(convert_shard).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue = list(reversed(tasks))
        pending: dict[Any, tuple[ShardTask, bool]] = {}
        while queue or pending:
            while queue and len(pending) < window:
                task = queue.pop()
                pending[convert.remote(task, out_dir)] = (task, False)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            task, isolated = pending.pop(ref)
            try:
                yield task, ray.get(ref)
            except WorkerCrashedError:
                if isolated:
                    yield task, f"its Ray worker died {TASK_RETRIES + 1} times, with each video in its own process too"
                    continue
                log(
                    f"adamae-shards: {task.name}: its Ray worker died {TASK_RETRIES + 1} times; making it again "
                    "with each video in its own process"
                )
                pending[convert.remote(task, out_dir, True)] = (task, True)
            except RayError as err:
                cause = getattr(err, "cause", None) or err
                yield task, storage.redact(" ".join(f"{type(cause).__name__}: {cause}".split()))[:300]
    finally:
        if started:
            ray.shutdown()


# -- the driver of a fixed-layout job (the whole job on Ray, or one part) --------------------------------------------


def part_name(part: int, parts: int) -> str:
    return f"{PARTS}/part-{part:05d}-of-{parts:05d}.json"


def build_distributed(
    src: Location,
    out_dir: Location,
    opts: ShardOptions,
    *,
    root: Location | None = None,
    fmt: str = "auto",
    label_map: dict[str, int] | None = None,
    workers: int = 1,
    distributor: str | None = None,
    ray_address: str | None = None,
    part: tuple[int, int] | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The job with fixed shards, on Ray or (``part=(I, N)``, by default with ``workers`` local processes) this part
    of it. Returns the manifest written (the part's own for a part); ``IncompleteJob`` when a shard could not be
    made (each one was reported through ``log``)."""
    log = log or default_log
    distributor = distributor or ("pool" if part is not None else "ray")
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"--distributor {distributor!r}: expected one of {DISTRIBUTORS}")
    if part is not None and distributor == "ray":
        raise ValueError("--part splits the job for a scheduler such as SLURM: use it with --distributor pool")
    job = ShardJob(src, opts, root, fmt, label_map)
    spans = plan(job)
    identity = {**job.identity, "layout": LAYOUT, "num_shards": len(spans)}
    out = str(out_dir)
    storage.make_dirs(out)
    name = MANIFEST
    indices = list(range(len(spans)))
    if part is not None:
        index, count = part
        name = part_name(index, count)
        indices = indices[index::count]
        storage.make_dirs(storage.join(out, PARTS))
        identity["part"] = [index, count]
    manifest, redo = _start_manifest(out, identity, job.labels, resume, log, name)
    shards: list[dict[str, Any]] = [s for s in manifest["shards"] if s not in redo]
    kept = {_index_of(s["name"], opts.prefix) for s in shards}
    manifest["shards"] = shards
    manifest["failures"] = [f for f in manifest["failures"] if _shard_of(f["position"], opts) in kept]
    todo = [shard_task(job, i, spans[i]) for i in indices if i not in kept]
    remove_stale_temporaries(out, opts.prefix, [t.name for t in todo])

    bar = tqdm(
        total=sum(spans[i][1] - spans[i][0] for i in indices),
        initial=sum(spans[i][1] - spans[i][0] for i in indices if i in kept),
        unit="video",
        desc="adamae-shards",
        disable=not progress,
        file=sys.stderr,
    )
    if distributor == "ray":
        results = ray_results(todo, out, ray_address, workers, log)
    else:
        results = pool_results(todo, out, workers)
    unmade: list[str] = []
    try:
        for task, outcome in results:
            bar.update(task.end - task.start)
            if isinstance(outcome, str):
                log(f"adamae-shards: {task.name} was not made: {outcome}; rerun with --resume to make it")
                unmade.append(task.name)
                continue
            shards.append(outcome["entry"])
            shards.sort(key=lambda s: _index_of(s["name"], opts.prefix))
            manifest["failures"].extend(job.failure(p, reason, log) for p, reason in outcome["failed"])
            manifest["failures"].sort(key=lambda f: f["position"])
            write_manifest(out, manifest, name)
            bar.set_postfix(shards=len(shards), failed=len(manifest["failures"]))
    finally:
        bar.close()
        remove_stale_temporaries(out, opts.prefix, [t.name for t in todo])  # a killed worker's half-written shard
    manifest.update(
        complete=not unmade,
        num_samples=sum(s["samples"] for s in shards),
        num_failures=len(manifest["failures"]),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_manifest(out, manifest, name)
    if unmade:
        raise IncompleteJob(
            f"{len(unmade)} shard(s) could not be made ({unmade[0]}, ...): rerun the same command with --resume"
        )
    return manifest


def _index_of(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1 : -len(".tar")])


def _shard_of(position: int, opts: ShardOptions) -> int:
    assert opts.samples_per_shard is not None
    return position // opts.samples_per_shard


def part_from_environment(text: str | None) -> tuple[int, int] | None:
    """``--part I/N`` (0 <= I < N), else the SLURM array task (``SLURM_ARRAY_TASK_ID`` counted from
    ``SLURM_ARRAY_TASK_MIN`` among ``SLURM_ARRAY_TASK_COUNT``), else None."""
    if text is not None:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--part {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        index, count = int(match.group(1)), int(match.group(2))
        source = f"--part {text!r}"
    elif os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        try:
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except ValueError:
            raise ValueError("SLURM_ARRAY_TASK_ID/_MIN/_COUNT: expected integers") from None
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    else:
        return None
    if not 0 <= index < count:
        raise ValueError(f"{source}: part {index} of {count}: expected 0 <= I < N (an array of consecutive ids)")
    return index, count


# -- merge -----------------------------------------------------------------------------------------------------------


class MergeError(RuntimeError):
    """The parts cannot be merged yet (one line saying which part to run)."""


def merge_parts(out_dir: Location, verify: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check that every part of the job in ``out_dir`` finished and every shard is there (size; ``verify``: sha256
    too), then write the job's ``manifest.json``."""
    log = log or default_log
    out = str(out_dir)
    shown = storage.redact(out)
    folder = storage.join(out, PARTS)
    listed = storage.names(folder, "part-*-of-*.json") if storage.exists(folder) else []
    found = [(PART_NAME.match(n), n) for n in listed]
    parts = {(int(m.group(1)), int(m.group(2))): n for m, n in found if m}
    if not parts:
        raise MergeError(f"{shown}: no {PARTS}/part-I-of-N.json: run adamae-shards with --part I/N first")
    counts = {count for _, count in parts}
    if len(counts) > 1:
        raise MergeError(f"{shown}/{PARTS}: parts of jobs split {sorted(counts)} ways: keep the parts of one job only")
    count = counts.pop()
    missing = [i for i in range(count) if (i, count) not in parts]
    if missing:
        raise MergeError(
            f"{shown}: part(s) {', '.join(f'{i}/{count}' for i in missing)} not started: run them with --part I/{count}"
        )
    manifests = [json.loads(storage.read_text(storage.join(folder, parts[(i, count)]))) for i in range(count)]
    unfinished = [f"{i}/{count}" for i, m in enumerate(manifests) if not m.get("complete")]
    if unfinished:
        raise MergeError(
            f"{shown}: part(s) {', '.join(unfinished)} not finished: rerun them with --part I/{count} --resume"
        )
    keys = ("source", "root", "format", "num_videos", "options", "layout", "num_shards", "label_map")
    first = manifests[0]
    for i, manifest in enumerate(manifests[1:], start=1):
        differing = [k for k in keys if manifest.get(k) != first.get(k)]
        if differing:
            detail = ", ".join(differing)
            raise MergeError(f"{shown}: part {i}/{count} was made with other inputs or options ({detail})")
    shards = sorted((s for m in manifests for s in m["shards"]), key=lambda s: s["records"][0])
    if len(shards) != first["num_shards"]:
        raise MergeError(f"{shown}: the parts list {len(shards)} shards, the job has {first['num_shards']}")
    for shard in shards:
        location = storage.join(out, shard["name"])
        good = verify_shard(out, shard) if verify else storage.size(location) == shard["bytes"]
        if not good:
            raise MergeError(
                f"{storage.redact(location)} is missing or "
                f"{'does not match its sha256' if verify else 'has another size'}: rerun its part with --resume"
            )
    failures = sorted((f for m in manifests for f in m["failures"]), key=lambda f: f["position"])
    manifest = {
        "tool": "adamae-shards",
        "version": tool_version(),
        "created": min(m["created"] for m in manifests),
        **{k: first[k] for k in ("source", "root", "format", "num_videos", "options", "layout", "num_shards")},
        "parts": count,
        "label_map": first["label_map"],
        "complete": True,
        "shards": shards,
        "failures": failures,
        "num_samples": sum(s["samples"] for s in shards),
        "num_failures": len(failures),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_manifest(out, manifest)
    log(f"adamae-shards: merged {count} parts: {len(shards)} shards in {shown}/{MANIFEST}")
    return manifest
