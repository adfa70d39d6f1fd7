"""``adamae-shards`` across machines, on real videos: Ray tasks on a local Ray cluster (127.0.0.1) and SLURM-style
parts run as separate processes, one killed and rerun, then merged: the same samples, byte for byte, as the
process pool, and every video written once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adamae_scale.data.distribute import MergeError, build_distributed, merge_parts, part_from_environment
from adamae_scale.data.pipeline import shard_urls
from adamae_scale.data.shards import ShardOptions, build_shards, sha256_file

from .conftest import REPO, cli_env
from .media import write_video
from .services import RAY_ENV, local_ray
from .test_shards import read_tar

OPTS = ShardOptions(short_side=32, min_frames=8, samples_per_shard=2)
CLI_OPTS = ["--short-side", "32", "--min-frames", "8", "--samples-per-shard", "2", "--no-progress"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """8 good videos in 2 classes (long enough that a shard takes a while) and 2 bad ones."""
    root = tmp_path_factory.mktemp("scale-videos")
    for i in range(8):
        write_video(root / f"class{i % 2}" / f"v{i}.mp4", num_frames=90 + 7 * i, size=(96, 128))
    (root / "class0" / "empty.mp4").write_bytes(b"")
    write_video(root / "class1" / "short.mp4", num_frames=4)
    return root


@pytest.fixture(scope="module")
def pool(videos, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("scale-pool")
    return build_shards(videos, out, OPTS, workers=2, progress=False), out


@pytest.fixture(scope="module")
def ray_address():
    with local_ray(num_cpus=2) as address:
        yield address


def samples_of(manifest: dict, folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a job: key → {extension: bytes}; a key written twice fails."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256_file(path)
        found = read_tar(path)
        assert len(found) == shard["samples"]
        assert not set(found) & set(samples), "a sample written twice"
        samples.update(found)
    return samples


def failures_of(manifest: dict) -> list[tuple[str, str, int]]:
    return [(f["path"], f["reason"], f["position"]) for f in manifest["failures"]]


def check_same_as_pool(manifest: dict, folder: Path, pool: tuple[dict, Path]) -> None:
    expected, pool_dir = pool
    assert manifest["complete"] and manifest["layout"] == "videos_per_shard" and manifest["num_shards"] == 5
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [s["records"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]]
    assert samples_of(manifest, folder) == samples_of(expected, pool_dir)  # keys, labels, media: byte for byte
    assert failures_of(manifest) == failures_of(expected) and len(expected["failures"]) == 2
    assert manifest["label_map"] == expected["label_map"] and manifest["num_samples"] == expected["num_samples"] == 8
    assert not list(folder.glob(".*tmp*"))


def shards_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adamae_scale.data.shards_cli", *args]


def test_ray_tasks_on_a_running_cluster_store_what_the_pool_stores(videos, pool, ray_address, tmp_path):
    out = tmp_path / "ray"
    cmd = shards_cli(str(videos), str(out), *CLI_OPTS, "--distributor", "ray", "--ray-address", ray_address)
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(**RAY_ENV), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    check_same_as_pool(manifest, out, pool)
    for path, reason, _ in failures_of(manifest):  # bad videos reported as the pool reports them
        assert f"adamae-shards: skipped {path}: {reason}" in proc.stderr
    assert "8 samples in 5 shards" in proc.stderr

    # A rerun keeps every verified shard; a shard that lost its file is made again, the same.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000003.tar").unlink()
    log: list[str] = []
    again = build_distributed(videos, out, OPTS, distributor="ray", resume=True, progress=False, log=log.append)
    assert any("4 shards verified, 1 to re-make" in line for line in log), log
    check_same_as_pool(again, out, pool)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "shard-000003.tar"} == {
        k: v for k, v in mtimes.items() if k != "shard-000003.tar"
    }


def first_writer(folder: Path, pattern: str, alive, exclude: int) -> tuple[str, int] | None:
    """The first half-written shard that matches ``pattern`` while ``alive()`` and the process writing it (its pid
    ends the temporary name); None if the job ended first."""
    while alive():
        for tmp in folder.glob(pattern):
            pid = int(tmp.name.rsplit("-", 1)[1])
            if pid != exclude:
                return tmp.name, pid
        time.sleep(0.002)
    return None


def kill_first_writer(folder: Path, pattern: str, alive, exclude: int) -> tuple[str, int] | None:
    """SIGKILL the process writing the first half-written shard that matches ``pattern``: ``first_writer``."""
    writer = first_writer(folder, pattern, alive, exclude)
    if writer is not None:
        os.kill(writer[1], signal.SIGKILL)
    return writer


def test_a_ray_worker_killed_mid_task_is_retried_and_every_video_written_once(videos, pool, ray_address, tmp_path):
    out = tmp_path / "ray-killed"
    result: dict = {}

    def drive() -> None:
        result["manifest"] = build_distributed(videos, out, OPTS, distributor="ray", progress=False, log=lambda _: None)

    driver = threading.Thread(target=drive)
    driver.start()
    killed = kill_first_writer(out, ".shard-*.tar.tmp-*", driver.is_alive, exclude=os.getpid())
    driver.join(timeout=300)
    assert killed is not None, "the job ended before a worker could be killed"
    check_same_as_pool(result["manifest"], out, pool)  # the task ran again; its half shard is gone


def test_parts_one_killed_and_rerun_then_merged(videos, pool, tmp_path):
    """The parts run as the sbatch recipe runs them in a SLURM array (the part from SLURM_ARRAY_TASK_*)."""
    out = tmp_path / "parts"
    common = [str(videos), str(out), *CLI_OPTS]

    def array_task(index: int) -> subprocess.Popen:
        slurm = dict(SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_MIN="0")
        return subprocess.Popen(
            ["bash", "tools/launch/shards.sbatch", *common],
            cwd=REPO,
            env=cli_env(**slurm, SLURM_CPUS_PER_TASK="1", PYTHON=sys.executable),
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as SLURM gives a task
        )

    others = [array_task(0), array_task(2)]
    victim = array_task(1)  # shards 1 and 4; the recipe execs Python, so its pid is the part's
    writing = first_writer(out, ".shard-000001.tar.tmp-*", lambda: victim.poll() is None, exclude=os.getpid())
    assert writing is not None
    os.killpg(victim.pid, signal.SIGKILL)  # pre-empted: SLURM kills the part and its decoding process
    assert victim.wait(timeout=60) == -signal.SIGKILL
    for proc in others:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert "adamae-shards merge" in err

    with pytest.raises(MergeError) as err:
        merge_parts(out)
    assert str(err.value) == f"{out}: part(s) 1/3 not finished: rerun them with --part I/3 --resume"
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError) as unmerged:  # training on it now would silently use the shards there so far
        shard_urls(str(out))
    assert str(unmerged.value) == (
        f"data.urls={out}: has parts/ from adamae-shards --part but no manifest.json: run `adamae-shards merge {out}` "
        "first"
    )

    rerun = subprocess.run(
        shards_cli(*common, "--part", "1/3", "--resume"), cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(out.glob(".*tmp*"))  # the killed part's half shard was cleared
    merge = subprocess.run(
        shards_cli("merge", str(out), "--verify"), cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert merge.returncode == 0, merge.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"] == 3
    check_same_as_pool(manifest, out, pool)


def test_part_and_layout_errors_are_one_line(videos, tmp_path, monkeypatch):
    assert part_from_environment("1/4") == (1, 4)
    with pytest.raises(ValueError, match=r"--part '4/4': part 4 of 4: expected 0 <= I < N"):
        part_from_environment("4/4")
    with pytest.raises(ValueError, match=r"--part 'x': expected I/N"):
        part_from_environment("x")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "2")
    assert part_from_environment(None) == (3, 4)
    with pytest.raises(ValueError, match="use --samples-per-shard without --bytes-per-shard"):
        build_distributed(videos, tmp_path / "x", ShardOptions(bytes_per_shard=10**6), part=(0, 2), progress=False)


def test_merge_of_nothing_is_one_line(tmp_path, capsys):
    from adamae_scale.data.shards_cli import main

    assert main(["merge", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"adamae-shards merge: error: {tmp_path}: no parts/part-I-of-N.json: run adamae-shards with --part I/N first\n"
    )
