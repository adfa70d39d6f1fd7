"""``adamae-bench scale``: shard creation and shard streaming at cluster scale, on this machine.

1. Videos per second of ``adamae-shards`` on a Kinetics-shaped set that the benchmark makes (640x360, 30 fps,
   10 s of H.264 with B-frames), at the same number of workers: the process pool, Ray tasks on a local Ray
   cluster (started before timing; its start-up is reported apart), and the job split into parts run at the
   same time as separate processes plus ``merge`` (as a SLURM array would run them).
2. Training clips per second of the shard loader from the local shards and from the same shards in an
   S3-protocol server (``--s3-endpoint``, or a ``moto_server`` the benchmark starts on 127.0.0.1), after a
   warm-up; both read the same shards in the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..data import storage
from ..data.distribute import build_distributed, merge_parts
from ..data.pipeline import ShardClips, ShardDataConfig
from ..data.shards import ShardOptions, build_shards

SIZE = (360, 640)  # height, width
FPS = 30
SECONDS = 10.0


def kinetics_like_video(path: Path, seed: int, seconds: float = SECONDS) -> Path:
    """A 640x360 30 fps H.264 mp4 with B-frames whose picture moves (a drifting textured background and a
    moving block), so that it costs about what a Kinetics clip costs to decode and re-encode."""
    rng = np.random.default_rng(seed)
    height, width = SIZE
    texture = rng.integers(0, 256, (height // 4, width // 4 + 64, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "bf": "3", "g": "60"}
        for i in range(int(seconds * FPS)):
            shift = (2 * i) % 256
            frame = np.ascontiguousarray(texture[:, shift : shift + width])
            y, x = (3 * i) % (height - 64), (5 * i) % (width - 64)
            frame[y : y + 64, x : x + 64] = (255 - 2 * (i % 100), 40, 200)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _has_b_frames(path: Path) -> bool:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return bool(stream.codec_context.has_b_frames) or any(
            str(frame.pict_type).endswith("B") for _, frame in zip(range(60), container.decode(stream), strict=False)
        )


def _timed(action: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def _ray_warmup() -> Any:
    """A Ray task that imports the converter and holds its worker a moment (so each lands on its own worker)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm(seconds: float) -> int:
        from ..data import distribute  # noqa: F401 (the import is the warm-up)

        time.sleep(seconds)
        return os.getpid()

    return warm


def _run_part(videos: str, out: str, opts: ShardOptions, part: tuple[int, int]) -> None:
    build_distributed(videos, out, opts, part=part, workers=1, progress=False, log=lambda _: None)


def _time_pool(videos: Path, out: Path, opts: ShardOptions, workers: int) -> float:
    _, seconds = _timed(lambda: build_shards(videos, out, opts, workers=workers, progress=False, log=_quiet))
    return seconds


def _time_parts(videos: Path, out: Path, opts: ShardOptions, parts: int) -> float:
    """Parts as a SLURM array runs them: separate processes at the same time, one worker each, then merge."""
    context = multiprocessing.get_context("fork")  # the benchmark's imports are done: no start-up to time
    start = time.perf_counter()
    procs = [context.Process(target=_run_part, args=(str(videos), str(out), opts, (i, parts))) for i in range(parts)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"a part failed: exit codes {[p.exitcode for p in procs]}")
    merge_parts(out, log=_quiet)
    return time.perf_counter() - start


def _time_ray(videos: Path, out: Path, opts: ShardOptions, workers: int) -> dict[str, float] | None:
    """A local Ray cluster of ``workers`` CPUs on 127.0.0.1, started and its workers warmed up before timing (a
    cluster converting 240k videos pays that once), shut down after."""
    # Read when Ray is imported: every Ray service addressed on 127.0.0.1, no traffic leaves the machine.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        return None
    warm = _ray_warmup()
    _, start_s = _timed(
        lambda: ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    )
    try:
        _, warm_s = _timed(lambda: ray.get([warm.remote(0.5) for _ in range(workers)]))
        _, seconds = _timed(lambda: build_distributed(videos, out, opts, distributor="ray", progress=False, log=_quiet))
    finally:
        ray.shutdown()
    return {"seconds": seconds, "cluster_start_s": start_s, "workers_start_s": warm_s}


def _quiet(line: str) -> None:
    pass


def _summary(videos: int, times: list[float]) -> dict[str, Any]:
    """The best of the repeats (the least disturbed by other work on the machine) and every time."""
    return {"videos_per_s": round(videos / min(times), 3), "seconds": [round(t, 2) for t in times]}


def _conversion(videos: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each way in turn, ``--repeats`` rounds (interleaved, so that a change of load on the machine affects all)."""
    opts = ShardOptions(short_side=args.short_side, samples_per_shard=args.videos_per_shard)
    times: dict[str, list[float]] = {"pool": [], "parts": [], "ray": []}
    ray_setup: list[dict[str, float]] = []
    for round_ in range(args.repeats):
        times["pool"].append(_time_pool(videos, work / f"pool{round_}", opts, args.workers))
        times["parts"].append(_time_parts(videos, work / f"parts{round_}", opts, args.workers))
        ray_times = _time_ray(videos, work / f"ray{round_}", opts, args.workers)
        if ray_times is not None:
            times["ray"].append(ray_times.pop("seconds"))
            ray_setup.append(ray_times)
    results: dict[str, Any] = {"pool": _summary(args.videos, times["pool"])}
    results[f"{args.workers}_parts"] = _summary(args.videos, times["parts"])
    if times["ray"]:
        results["ray"] = _summary(args.videos, times["ray"])
        results["ray"]["cluster_start_s"] = [round(r["cluster_start_s"], 2) for r in ray_setup]
        results["ray"]["workers_start_s"] = [round(r["workers_start_s"], 2) for r in ray_setup]
        results["ray_over_pool"] = round(results["ray"]["videos_per_s"] / results["pool"]["videos_per_s"], 3)
    else:
        results["ray"] = {"skipped": "ray is not installed: pip install 'adamae_scale[ray]'"}
    results["parts_over_pool"] = round(
        results[f"{args.workers}_parts"]["videos_per_s"] / results["pool"]["videos_per_s"], 3
    )
    return results


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _s3_endpoint(given: str | None) -> Iterator[tuple[str | None, int | None]]:
    """(endpoint, the pid of the server this benchmark started, whose CPU time it reports)."""
    if given:
        yield given, None
        return
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        yield None, None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env["AWS_ENDPOINT_URL"], server.pid
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        server.terminate()
        server.wait(timeout=10)


def _clips_per_s(urls: str, args: argparse.Namespace) -> float:
    cfg = ShardDataConfig(
        urls=urls,
        num_frames=16,
        img_size=(224, 224),
        sampling_rate=4,
        workers=args.workers,
        shuffle_buffer=16,
        shuffle_initial=4,
        # Shards drawn with replacement, as a long run streams them: the timing never crosses an epoch's end, where
        # the loader starts new workers (and new S3 clients), a cost a real epoch of 240k clips pays once.
        resampled=True,
    )
    stream = ShardClips(cfg, batch_size=4)
    try:
        for _ in range(args.warmup):
            next(stream)
        done, start = 0, time.perf_counter()
        while done < args.clips:
            done += len(next(stream)["video"])
        return done / (time.perf_counter() - start)
    finally:
        stream.close()


def _loading(shards: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Local then S3, ``--repeats`` rounds; the best of each (the least disturbed) and every figure."""
    with _s3_endpoint(args.s3_endpoint) as (endpoint, server):
        if endpoint is None:
            local = [_clips_per_s(str(shards), args) for _ in range(args.repeats)]
            return {"local_clips_per_s": round(max(local), 2), "s3": "skipped: no moto_server and no --s3-endpoint"}
        bucket = f"adamae-bench-{os.getpid()}"
        fs, _ = storage.filesystem(f"s3://{bucket}")
        fs.mkdir(bucket)
        fs.put(str(shards), f"{bucket}/shards", recursive=True)
        local, remote, server_cpu, wall = [], [], [], []
        for _ in range(args.repeats):
            local.append(_clips_per_s(str(shards), args))
            before, start = (_cpu_seconds(server) if server else 0.0), time.perf_counter()
            remote.append(_clips_per_s(f"s3://{bucket}/shards", args))
            wall.append(time.perf_counter() - start)
            server_cpu.append((_cpu_seconds(server) - before) if server else 0.0)
        if args.s3_endpoint:
            fs.rm(bucket, recursive=True)
    return {
        "local_clips_per_s": round(max(local), 2),
        "s3_clips_per_s": round(max(remote), 2),
        "s3_over_local": round(max(remote) / max(local), 3),
        "every_local": [round(x, 2) for x in local],
        "every_s3": [round(x, 2) for x in remote],
        # A server on this machine takes CPU from the loader's workers; a real object store does not.
        "s3_server_cpu_share": [round(c / w, 3) for c, w in zip(server_cpu, wall, strict=True)] if server else None,
        "s3_endpoint": "moto_server on 127.0.0.1" if not args.s3_endpoint else storage.redact(args.s3_endpoint),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="adamae-bench-scale-", dir=args.work_dir))
    try:
        videos = work / "videos"
        _, made_s = _timed(
            lambda: [kinetics_like_video(videos / f"c{i % 4}" / f"v{i:04d}.mp4", i) for i in range(args.videos)]
        )
        sample = next(videos.rglob("*.mp4"))
        result: dict[str, Any] = {
            "videos": args.videos,
            "video": {
                "size": f"{SIZE[1]}x{SIZE[0]}",
                "fps": FPS,
                "seconds": SECONDS,
                "b_frames": _has_b_frames(sample),
            },
            "workers": args.workers,
            "videos_per_shard": args.videos_per_shard,
            "short_side": args.short_side,
            "make_videos_s": round(made_s, 1),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        }
        result["conversion"] = _conversion(videos, work, args)
        # The loader reads shards of a useful size: every video cut into 2.5 s clips, 20 clips a shard.
        loader_opts = ShardOptions(short_side=args.short_side, clip_duration=2.5, samples_per_shard=20)
        build_shards(videos, work / "loader", loader_opts, workers=args.workers, progress=False, log=_quiet)
        result["loading"] = _loading(work / "loader", args)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
