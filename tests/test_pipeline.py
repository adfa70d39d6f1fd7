"""The shard pipeline: clips from real shards, exactly-once epochs over 2 ranks x 2 workers, exact resume
from rank 0's state, corrupt samples and unreadable shards counted (and fatal above the limit), and
pre-training from shards."""

import io
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tarfile
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from adamae_scale.base.pixels import denormalize
from adamae_scale.data import build_data
from adamae_scale.data.pipeline import CorruptDataError, ShardClips, ShardDataConfig, shard_urls
from adamae_scale.data.shards import ShardOptions, build_shards
from adamae_scale.metrics import read_metrics

from .conftest import REPO, cli_env, free_port, run_pretrain, run_torchrun
from .media import copy_real, write_video

CLIP = dict(num_frames=4, img_size=(32, 32), sampling_rate=2)


def make_videos(root: Path, count: int) -> None:
    for i in range(count):
        write_video(root / f"class{i % 3}" / f"v{i:02d}.mp4", num_frames=20 + 3 * i, size=(48, 64))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """13 generated videos → 5 jpg shards (3, 3, 3, 3, 1 samples) and the same as mp4 shards."""
    root = tmp_path_factory.mktemp("pipeline")
    make_videos(root / "videos", 13)
    out = {}
    for store in ("jpg", "mp4"):
        opts = ShardOptions(store=store, short_side=32, min_frames=8, samples_per_shard=3)
        manifest = build_shards(root / "videos", root / store, opts, workers=2, progress=False)
        assert manifest["num_samples"] == 13 and len(manifest["shards"]) == 5
        out[store] = root / store
    return out


def all_keys(folder: Path) -> set[str]:
    keys = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as f:
            keys |= {m.name.split(".")[0] for m in f}
    return keys


@pytest.mark.parametrize("store", ["jpg", "mp4"])
def test_batches_of_normalised_clips_from_both_storage_formats(shards, store):
    stream = ShardClips(ShardDataConfig(urls=str(shards[store]), workers=2, **CLIP), batch_size=4)
    seen = []
    for _ in range(4):
        batch = next(stream)
        assert batch["video"].shape == (4, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
        pixels = denormalize(batch["video"])
        assert pixels.min() > -0.01 and pixels.max() < 1.01 and pixels.std() > 0.05
        assert batch["label"].shape == (4,) and set(batch["label"].tolist()) <= {0, 1, 2}
        seen += batch["key"]
    assert set(seen[:13]) == all_keys(shards[store])  # the first 13 clips are epoch 0, each sample once
    assert stream.metrics()["data_corrupt"] == 0
    stream.close()


def test_labels_follow_the_class_folders(shards):
    stream = ShardClips(ShardDataConfig(urls=str(shards["jpg"]), workers=0, shuffle_buffer=0, **CLIP), batch_size=13)
    batch = next(stream)
    manifest = json.loads((shards["jpg"] / "manifest.json").read_text())
    by_key = {}
    for shard in manifest["shards"]:
        with tarfile.open(shards["jpg"] / shard["name"]) as f:
            for m in f:
                if m.name.endswith(".json"):
                    meta = json.loads(f.extractfile(m).read())
                    by_key[meta["key"]] = manifest["label_map"][meta["source"].split("/")[0]]
    assert dict(zip(batch["key"], batch["label"].tolist(), strict=True)) == by_key


def test_urls_as_pattern_list_folder_manifest_and_pipe(shards):
    folder = shards["jpg"]
    names = sorted(p.name for p in folder.glob("*.tar"))
    expected = [str(folder / n) for n in names]
    assert sorted(shard_urls(str(folder))) == expected
    assert sorted(shard_urls(str(folder / "manifest.json"))) == expected
    assert shard_urls(f"{folder}/shard-{{000000..000004}}.tar") == expected
    assert shard_urls([expected[0], f"{folder}/shard-{{000001..000002}}.tar"]) == expected[:3]
    with pytest.raises(ValueError, match="shard\\(s\\) not found"):
        shard_urls(f"{folder}/shard-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="data.urls is required"):
        shard_urls(None)
    piped = [f"pipe:cat {u}" for u in expected]
    stream = ShardClips(ShardDataConfig(urls=piped, workers=0, **CLIP), batch_size=13)
    assert set(next(stream)["key"]) == all_keys(folder)


def run_data_ranks(world: int, args: dict) -> list[dict]:
    """``tests/dist_data.py`` as ``world`` real processes on gloo; their JSON results."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.dist_data", json.dumps(args)],
            cwd=REPO,
            env=cli_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-4000:]
    return [json.loads((Path(args["out"]) / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("store", ["jpg", "mp4"])
def test_two_ranks_two_workers_exactly_once_and_resume_from_rank0_state(shards, store, tmp_path):
    cfg = dict(urls=str(shards[store]), workers=2, shuffle_buffer=4, shuffle_initial=2, **CLIP)
    results = run_data_ranks(2, {"out": str(tmp_path), "cfg": cfg, "batch_size": 2, "first": 3, "then": 5})

    # Exactly once: the ranks' epoch-0 clips are disjoint and together are the whole data set.
    epoch0 = [k for r in results for k in r["epoch0"]]
    assert len(epoch0) == len(set(epoch0)) == 13
    assert set(epoch0) == all_keys(shards[store])
    assert all(r["epoch0"] for r in results)  # both ranks had work

    # Resume: each rank, restarted from the state rank 0 saved, continues its own stream clip for clip
    # (keys, epochs and the augmented pixels), through the end of epoch 0 and into epoch 1.
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["ranks"]) == 2 and state["batches"] == 3
    assert any(p["offset"] > 0 or any(p["consumed"]) for p in state["ranks"])  # stopped mid-epoch
    for rank, result in enumerate(results):
        assert result["resumed"] == result["straight"], f"rank {rank} diverged after resuming"
        epochs = [e for b in result["straight"] for e in b["epoch"]]
        assert epochs[0] == 0 and epochs[-1] >= 1
        assert all(b["shape"] == [2, 3, 4, 32, 32] for b in result["straight"])
    assert results[0]["straight"] != results[1]["straight"]
    assert results[0]["metrics"]["data_corrupt"] == 0


def write_corrupt_shard(path: Path, good_jpg_shard: Path, marker: Path) -> list[str]:
    """A shard whose samples are all broken in a different way; returns their keys."""
    with tarfile.open(good_jpg_shard) as f:
        members = {m.name: f.extractfile(m).read() for m in f}
    key = sorted(members)[0].split(".")[0]
    meta = json.loads(members[f"{key}.json"])
    blob, offsets = members[f"{key}.mjpeg"], meta["frame_offsets"]
    frames = {f"{i:06d}.jpg": blob[a:b] for i, (a, b) in enumerate(pairwise(offsets))}

    class Trap:  # unpickling this would create ``marker``
        def __reduce__(self):
            return (Path.touch, (marker,))

    garbage = b"\xff\xd8 not a jpeg".ljust(len(blob), b"\x00")
    samples = {
        "bad_bytes": {"json": json.dumps(meta).encode(), "mjpeg": garbage},
        "no_json": {"mjpeg": blob},
        "bad_count": {"json": json.dumps({**meta, "num_frames": "many"}).encode(), "mjpeg": blob},
        "bad_offsets": {"json": json.dumps({**meta, "frame_offsets": offsets[:-1]}).encode(), "mjpeg": blob},
        "lost_frames": {"json": json.dumps(meta).encode(), "000000.jpg": frames["000000.jpg"]},
        "pickled": {"pyd": pickle.dumps(Trap()), "pickle": pickle.dumps(Trap())},
        "bad_mp4": {"json": json.dumps({**meta, "format": "mp4"}).encode(), "mp4": b"\x00\x00\x00\x18ftypisom" * 9},
    }
    with tarfile.open(path, "w") as tar:
        for name, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return list(samples)


def test_corrupt_samples_are_skipped_counted_and_fatal_above_the_limit(shards, tmp_path, capfd):
    marker = tmp_path / "unpickled"
    corrupt = write_corrupt_shard(tmp_path / "corrupt.tar", shards["jpg"] / "shard-000000.tar", marker)
    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar")) + [str(tmp_path / "corrupt.tar")]
    stream = ShardClips(ShardDataConfig(urls=urls, workers=2, max_corrupt_fraction=0.5, **CLIP), batch_size=13)
    batch = next(stream)
    assert set(batch["key"]) == all_keys(shards["jpg"])  # every good clip, no broken one
    metrics = stream.metrics()
    assert metrics["data_corrupt"] == len(corrupt) == 7
    assert metrics["data_corrupt_fraction"] == pytest.approx(7 / 20)
    stream.close()
    assert not marker.exists()  # nothing was unpickled
    err = capfd.readouterr().err
    for key, reason in (
        ("bad_bytes", "cannot identify image file"),
        ("no_json", "no .json member"),
        ("bad_count", "num_frames must be a positive integer"),
        ("bad_offsets", "frame_offsets do not describe"),
        ("lost_frames", "is missing"),
        ("pickled", "no .json member"),
        ("bad_mp4", ""),
    ):
        assert f"corrupt.tar {key}: " in err and reason in err, key

    strict = ShardClips(
        ShardDataConfig(
            urls=urls, workers=0, shuffle_buffer=0, max_corrupt_fraction=0.05, corrupt_check_after=10, **CLIP
        ),
        batch_size=4,
    )
    with pytest.raises(CorruptDataError, match=r"corrupt \(\d+\.\d% > data.max_corrupt_fraction=0.05\)"):
        for _ in range(10):
            next(strict)


def write_random_shard(path: Path) -> str:
    """A ``.tar`` of random bytes: not a tar archive."""
    path.write_bytes(random.Random(0).randbytes(40_000))
    return str(path)


def write_truncated_shard(path: Path, good_shard: Path) -> list[str]:
    """``good_shard``'s samples under new keys, cut in the middle of the last file's data; returns the keys
    of the complete samples before the cut."""
    with tarfile.open(good_shard) as f:
        members = [(f"cut{m.name}", f.extractfile(m).read()) for m in f]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    return keys[:-1]  # the last sample is cut


def with_unreadable_shards(shards, folder: Path) -> tuple[list[str], str, str, set[str]]:
    """The good jpg shards plus a random-bytes shard and a truncated one: (urls, random shard, truncated
    shard, every key an epoch delivers)."""
    noise = write_random_shard(folder / "shard-000005.tar")
    cut = folder / "shard-000006.tar"
    cut_keys = write_truncated_shard(cut, shards["jpg"] / "shard-000000.tar")
    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar")) + [noise, str(cut)]
    return urls, noise, str(cut), all_keys(shards["jpg"]) | set(cut_keys)


def test_unreadable_shards_are_reported_once_skipped_and_counted(shards, tmp_path, capfd):
    urls, noise, cut, usable = with_unreadable_shards(shards, tmp_path)
    stream = ShardClips(ShardDataConfig(urls=urls, workers=2, **CLIP), batch_size=5)
    by_epoch = defaultdict(list)
    while len(by_epoch) < 4:  # three whole epochs
        batch = next(stream)
        for key, epoch in zip(batch["key"], batch["epoch"].tolist(), strict=True):
            by_epoch[epoch].append(key)
    for epoch in (0, 1, 2):  # every good sample (the truncated shard's before the cut too) exactly once
        assert sorted(by_epoch[epoch]) == sorted(usable), epoch
    assert stream.metrics()["data_corrupt"] == 2  # one per unreadable shard, not one per epoch
    assert stream.unreadable == {noise: 0, cut: 2}
    stream.close()
    err = capfd.readouterr().err
    assert err.count(noise) == 1 and err.count(cut) == 1, err  # once in three epochs, by name
    assert f"[adamae] data: skipping unreadable shard {noise}: not a tar archive (" in err
    assert f"[adamae] data: skipping unreadable shard {cut}: truncated or damaged after " in err
    assert "(unexpected end of data); its first 2 samples, complete before that, are used" in err
    assert "skipped corrupt sample" not in err


def test_an_unreadable_shard_above_the_corrupt_limit_stops_with_one_line(shards, tmp_path, capfd):
    noise = write_random_shard(tmp_path / "shard-000005.tar")
    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar")) + [noise]
    cfg = ShardDataConfig(urls=urls, workers=2, max_corrupt_fraction=0.05, corrupt_check_after=5, **CLIP)
    stream = ShardClips(cfg, batch_size=4)
    with pytest.raises(CorruptDataError) as stopped:
        for _ in range(8):
            next(stream)
    stream.close()
    message = str(stopped.value)
    assert "\n" not in message and "> data.max_corrupt_fraction=0.05)" in message
    assert f"including the unreadable shard {noise} (not a tar archive (" in message
    assert noise not in capfd.readouterr().err  # stopped, not skipped: named once, in the error


class FailingRead(io.BufferedReader):
    """A shard's reader whose storage fails (a connection reset) once ``limit`` bytes were read."""

    def __init__(self, path: str, limit: int):
        super().__init__(io.FileIO(path))
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.limit:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(size if size is not None and size >= 0 else self.limit - self.tell())


def test_a_read_error_skips_the_shard_for_that_epoch_only(shards, monkeypatch, capfd):
    import webdataset

    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar"))
    flaky, opened = urls[2], []
    real_gopen = webdataset.gopen

    def gopen(url, *args, **kwargs):
        if url != flaky:
            return real_gopen(url, *args, **kwargs)
        opened.append(url)
        if len(opened) == 1:  # epoch 0: the file system is not there
            raise OSError(116, "Stale file handle", url)
        if len(opened) == 2:  # epoch 1: it fails half-way through the shard
            return FailingRead(url, Path(url).stat().st_size // 2)
        return real_gopen(url, *args, **kwargs)

    monkeypatch.setattr(webdataset, "gopen", gopen)
    stream = ShardClips(ShardDataConfig(urls=urls, workers=0, **CLIP), batch_size=1)
    by_epoch = keys_by_epoch(stream, 3)
    with tarfile.open(flaky) as f:
        flaky_keys = {m.name.split(".")[0] for m in f}
    every = all_keys(shards["jpg"])
    assert set(by_epoch[0]) == every - flaky_keys
    assert set(by_epoch[0]) < set(by_epoch[1]) < every  # the samples read before the error are used
    assert sorted(by_epoch[2]) == sorted(every)  # read again, whole: the error was not remembered as damage
    assert stream.unreadable == {} and stream.state_dict()["ranks"][0]["unreadable"] == {}
    assert stream.metrics()["data_corrupt"] == 0
    stream.close()
    err = capfd.readouterr().err
    assert f"[adamae] data: could not read shard {flaky} (OSError: [Errno 116] Stale file handle" in err
    assert f"could not read shard {flaky} (ConnectionResetError after " in err
    assert err.count("could not read shard") == 2 and "unreadable" not in err


def test_a_failing_pipe_command_is_a_read_error_not_a_damaged_shard(shards, tmp_path, capfd):
    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar"))
    empty, cut = urls[1], urls[3]
    size = Path(cut).stat().st_size
    # Real commands that fail the first time they run, as a copy tool losing its connection does: one writes
    # nothing, the other half the shard, and both exit non-zero; the next time, they copy the whole shard.
    first, second = tmp_path / "first.ran", tmp_path / "second.ran"
    piped = list(urls)
    piped[1] = f"pipe:if [ -e {first} ]; then cat {empty}; else touch {first}; exit 7; fi"
    piped[3] = f"pipe:if [ -e {second} ]; then cat {cut}; else touch {second}; head -c {size // 2} {cut}; exit 1; fi"
    stream = ShardClips(ShardDataConfig(urls=piped, workers=0, **CLIP), batch_size=1)
    by_epoch = keys_by_epoch(stream, 2)
    with tarfile.open(empty) as f:
        empty_keys = {m.name.split(".")[0] for m in f}
    every = all_keys(shards["jpg"])
    assert empty_keys < every and set(by_epoch[0]) < every - empty_keys  # without the empty one, the cut one partly
    assert sorted(by_epoch[1]) == sorted(every)  # both read again, whole: neither was remembered as damaged
    assert stream.unreadable == {} and stream.metrics()["data_corrupt"] == 0
    stream.close()
    err = capfd.readouterr().err
    assert f"could not read shard {piped[1]} (OSError: the command exited with status 7)" in err
    # How much of the cut shard came before the error depends on when webdataset saw the command exit.
    assert re.search(
        f"could not read shard {re.escape(piped[3])} \\(OSError( after \\d+ files)?: the command exited", err
    )
    assert err.count("could not read shard") == 2 and "unreadable" not in err


def stored_keys(tar: str) -> list[str]:
    with tarfile.open(tar) as f:
        return list(dict.fromkeys(m.name.split(".")[0] for m in f))


def test_a_one_pass_reader_opens_a_failing_shard_again_and_continues_where_it_stopped(shards, tmp_path, capfd):
    from adamae_scale.data.eval_clips import shard_clips
    from adamae_scale.data.pipeline import every_sample_once

    tar = sorted(str(p) for p in shards["jpg"].glob("*.tar"))[3]
    half, ran = Path(tar).stat().st_size // 2, tmp_path / "ran"
    # Cut off half-way the first time it runs (a copy tool losing its connection), whole after that.
    flaky = f"pipe:if [ -e {ran} ]; then cat {tar}; else touch {ran}; head -c {half} {tar}; exit 1; fi"
    broken = f"pipe:head -c {half} {tar}; exit 1"  # never whole
    unreadable: list[tuple[str, str, int]] = []
    samples = every_sample_once([flaky, broken], lambda *why: unreadable.append(why), lambda err: True, pause_s=0)
    keys = [(sample["__url__"], sample["__key__"]) for sample in samples]
    given = sum(url == broken for url, _ in keys)
    assert [key for url, key in keys if url == flaky] == stored_keys(tar)  # every sample once, in stored order
    assert given < len(stored_keys(tar))  # the broken one's complete samples, once, in spite of 3 reads
    assert [(url, usable) for url, _, usable in unreadable] == [(broken, given)]
    assert re.fullmatch(
        r"could not be read in 3 tries \(OSError( after \d+ files)?: the command exited with status 1\)",
        unreadable[0][1],
    )
    err = capfd.readouterr().err
    assert f"could not read shard {flaky} (OSError" in err and "opening it again (2 of 3) after its " in err
    assert err.count("opening it again") == 3  # once for the flaky shard, twice for the broken one

    # Pictures and evaluation read shards this way: the flaky shard's clips all come, each once.
    ran.unlink()
    assert [key for key, _ in shard_clips([flaky], 4, (32, 32), 2)] == stored_keys(tar)


def test_resampled_draws_skip_an_unreadable_shard_once_known(shards, tmp_path, capfd):
    noise = write_random_shard(tmp_path / "shard-000005.tar")
    urls = sorted(str(p) for p in shards["jpg"].glob("*.tar")) + [noise]
    stream = ShardClips(ShardDataConfig(urls=urls, resampled=True, workers=2, **CLIP), batch_size=4)
    for _ in range(12):  # the seeded draws (with replacement) of these 6 shards hit the bad one
        assert next(stream)["video"].shape == (4, 3, 4, 32, 32)
    assert stream.metrics()["data_corrupt"] == 1
    stream.close()
    assert capfd.readouterr().err.count(noise) == 1

    only_noise = ShardClips(ShardDataConfig(urls=[noise], resampled=True, workers=2, **CLIP), batch_size=4)
    with pytest.raises(CorruptDataError, match="none of the 1 shards can be read"):
        next(only_noise)  # not an endless draw of a shard known to be unreadable
    only_noise.close()


def summary(batch) -> dict:
    return {"key": batch["key"], "epoch": batch["epoch"].tolist(), "sum": float(batch["video"].double().sum())}


def test_resume_past_unreadable_shards_is_exact_and_does_not_report_them_again(shards, tmp_path, capfd):
    urls, noise, cut, _ = with_unreadable_shards(shards, tmp_path)
    cfg = ShardDataConfig(urls=urls, workers=2, shuffle_buffer=4, shuffle_initial=2, **CLIP)
    straight = ShardClips(cfg, batch_size=2)
    expected = [summary(next(straight)) for _ in range(12)]
    straight.close()

    for stop in (3, 9):  # inside epoch 0 (found or not yet), and in epoch 1 (both found)
        interrupted = ShardClips(cfg, batch_size=2)
        got = [summary(next(interrupted)) for _ in range(stop)]
        state = json.loads(json.dumps(interrupted.state_dict()))
        interrupted.close()
        capfd.readouterr()
        resumed = ShardClips(cfg, batch_size=2)
        resumed.load_state_dict(state)
        got += [summary(next(resumed)) for _ in range(12 - stop)]
        assert got == expected, f"diverged after resuming at batch {stop}"
        assert resumed.metrics()["data_corrupt"] == 2
        resumed.close()
        err = capfd.readouterr().err
        for shard in state["ranks"][0]["unreadable"]:
            assert shard not in err  # known from the state: neither reported nor counted again
    assert state["ranks"][0]["unreadable"] == {noise: 0, cut: 2}


def keys_by_epoch(stream: ShardClips, epochs: int) -> dict[int, list[str]]:
    """The keys ``stream`` delivers, by epoch, until it has begun ``epochs`` epochs past its first."""
    by_epoch = defaultdict(list)
    while len(by_epoch) <= epochs:
        batch = next(stream)
        for key, epoch in zip(batch["key"], batch["epoch"].tolist(), strict=True):
            by_epoch[epoch].append(key)
    return by_epoch


def test_resume_with_other_shards_or_seed_starts_the_next_epoch_over_them_and_says_why(shards, tmp_path):
    tars = sorted(str(p) for p in shards["jpg"].glob("*.tar"))
    cut = tmp_path / "shard-000009.tar"
    cut_keys = write_truncated_shard(cut, Path(tars[0]))
    whole = cut.with_name("whole.tar")
    with tarfile.open(tars[0]) as f, tarfile.open(whole, "w") as out:
        for member in f:
            data = f.extractfile(member).read()
            member.name = f"cut{member.name}"
            out.addfile(member, io.BytesIO(data))
    options = dict(workers=0, shuffle_buffer=4, shuffle_initial=2, **CLIP)

    # An interrupted run over 4 shards and a truncated one; the user then completes the shard job: the
    # truncated shard is made again whole, under its name, and a fifth shard comes.
    before = ShardClips(ShardDataConfig(urls=tars[:4] + [str(cut)], **options), batch_size=2)
    keys_by_epoch(before, 1)
    assert before.unreadable == {str(cut): len(cut_keys)}
    state = json.loads(json.dumps(before.state_dict()))
    before.close()
    whole.replace(cut)
    after = ShardClips(ShardDataConfig(urls=tars + [str(cut)], **options), batch_size=2)
    with pytest.warns(UserWarning, match=r"another layout or stream \(shards 5->6\): starting epoch 2 from"):
        after.load_state_dict(state)
    by_epoch = keys_by_epoch(after, 1)
    assert min(by_epoch) == 2  # not the rest of epoch 1, whose samples were over other shards
    every = sorted(all_keys(shards["jpg"]) | all_keys(tmp_path))
    assert sorted(by_epoch[2]) == every  # each sample once, the new shard's and the remade shard's whole
    after.close()

    # Another seed orders the samples otherwise: the rest of the epoch cannot be told apart.
    before = ShardClips(ShardDataConfig(urls=tars, **options), batch_size=2)
    for _ in range(3):
        next(before)
    state = before.state_dict()
    after = ShardClips(ShardDataConfig(urls=tars, seed=7, **options), batch_size=2)
    with pytest.warns(UserWarning, match=r"\(seed 0->7\): starting epoch 1 from"):
        after.load_state_dict(state)
    assert min(keys_by_epoch(after, 0)) == 1
    for stream in (before, after):
        stream.close()


def test_two_ranks_with_unreadable_shards_exactly_once_and_resume(shards, tmp_path):
    urls, noise, cut, usable = with_unreadable_shards(shards, tmp_path)
    cfg = dict(urls=urls, workers=2, shuffle_buffer=4, shuffle_initial=2, **CLIP)
    results = run_data_ranks(2, {"out": str(tmp_path), "cfg": cfg, "batch_size": 2, "first": 6, "then": 3})
    epoch0 = [k for r in results for k in r["epoch0"]]
    assert sorted(epoch0) == sorted(usable)
    state = json.loads((tmp_path / "state.json").read_text())
    assert {u: n for r in state["ranks"] for u, n in r["unreadable"].items()} == {noise: 0, cut: 2}
    for rank, result in enumerate(results):
        assert result["resumed"] == result["straight"], f"rank {rank} diverged after resuming"
    assert results[0]["metrics"]["data_corrupt"] >= 2


def test_fewer_shards_than_ranks_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="5 shards for 8 ranks"):
        ShardClips(ShardDataConfig(urls=str(shards["jpg"]), **CLIP), 2, rank=0, world_size=8)
    ShardClips(ShardDataConfig(urls=str(shards["jpg"]), resampled=True, **CLIP), 2, rank=0, world_size=8)


def test_resampled_mode_streams_forever_and_resumes_on_a_fresh_seed(shards):
    cfg = ShardDataConfig(urls=str(shards["mp4"]), resampled=True, workers=2, **CLIP)
    stream = ShardClips(cfg, batch_size=4)
    keys = [k for _ in range(8) for k in next(stream)["key"]]
    assert len(keys) == 32 and len(set(keys)) < 32  # with replacement: repeats within 32 > 13 clips
    state = stream.state_dict()
    again = ShardClips(cfg, batch_size=4)
    assert [k for _ in range(8) for k in next(again)["key"]] == keys  # seeded
    again.load_state_dict(state)
    assert again.batches == 8 and again.epoch != stream.epoch
    assert next(again)["video"].shape == (4, 3, 4, 32, 32)
    for s in (stream, again):
        s.close()


def test_build_data_reads_clip_geometry_from_the_model(shards):
    from adamae_scale.models import make_config

    model_cfg = make_config(
        {
            "name": "vit_tiny",
            "embed_dim": 192,
            "depth": 2,
            "num_heads": 3,
            "num_frames": 4,
            "img_size": [32, 48],
            "patch_size": 8,
        }
    )
    data = build_data(
        {"name": "shards", "urls": str(shards["jpg"]), "sampling_rate": 2, "workers": 0}, model_cfg, 2, 0, 1
    )
    assert next(data)["video"].shape == (2, 3, 4, 32, 48)


def pretrain_overrides(tiny_run, urls) -> list[str]:
    return [o for o in tiny_run if not o.startswith("data=")] + [
        "data=shards",
        f"data.urls={urls}",
        "data.workers=2",
        "data.sampling_rate=2",
        "data.shuffle_buffer=8",
        "data.max_corrupt_fraction=0.5",
        "precision=fp32",
        "ds=zero0",
        "train.steps=6",
        "eval.focus_batches=0",
    ]


def test_sigterm_to_the_process_group_with_workers_running_checkpoints(shards, tmp_path, tiny_run):
    """SLURM pre-emption and scancel signal every process of the job, DataLoader workers included."""
    from .test_scale import wait_for_step

    run_dir = tmp_path / "run"
    args = [*pretrain_overrides(tiny_run, shards["jpg"]), "train.steps=400", "train.ckpt_every=0", f"run_dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamae_scale.pretrain", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a batch job has
    )
    wait_for_step(run_dir, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    stopped_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"


def test_pretrain_from_shards_logs_corrupt_count_and_resumes_exactly(shards, tmp_path, tiny_run):
    folder = tmp_path / "data"
    folder.mkdir()
    for tar in shards["mp4"].glob("*.tar"):
        (folder / tar.name).symlink_to(tar)
    write_corrupt_shard(folder / "shard-corrupt.tar", shards["jpg"] / "shard-000000.tar", tmp_path / "unpickled")
    common = pretrain_overrides(tiny_run, folder)

    straight = tmp_path / "straight"
    proc = run_pretrain(*common, "train.ckpt_every=0", f"run_dir={straight}")
    assert "focus_ratio" not in proc.stdout  # the focus report is for synthetic data only
    records = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["data_corrupt"] >= 1 and "data_corrupt_fraction" in records[-1]
    assert all(r["loss"] == r["loss"] for r in records)  # finite

    stopped = tmp_path / "stopped"
    run_pretrain(*common, "train.ckpt_every=3", "train.stop_after=3", f"run_dir={stopped}")
    run_pretrain(*common, "train.ckpt_every=3", "train.resume=auto", f"run_dir={stopped}")
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert losses(stopped) == losses(straight)  # the data stream continued where it stopped

    # Over the limit: the rank that counted it stops the run with one line naming the unreadable shard.
    write_random_shard(folder / "shard-noise.tar")
    strict = ["data.max_corrupt_fraction=0.01", "data.corrupt_check_after=1", f"run_dir={tmp_path / 'strict'}"]
    proc = run_pretrain(*common, *strict, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("adamae-pretrain: error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "data.max_corrupt_fraction=0.01" in errors[0]


def test_pretrain_with_repeated_sampling_crops_each_decoded_clip_twice(shards, tmp_path, tiny_run):
    """data.repeated_aug=2 in pre-training: a micro-batch of 4 holds 2 decoded clips, each cropped twice (same key,
    different pixels, next to each other); a micro-batch that is not a whole number of clips fails before training."""
    from adamae_scale import schema

    overrides = [*pretrain_overrides(tiny_run, shards["mp4"]), "data.repeated_aug=2", "data.workers=0"]
    cfg = schema.compose([*overrides, f"run_dir={tmp_path / 'x'}"])
    model_cfg = schema.validate(cfg)
    data = build_data(cfg["data"], model_cfg, cfg["train"]["micro_batch_size"], 0, 1)
    batch = next(data)
    data.close()
    keys, video = batch["key"], batch["video"]
    assert video.shape[0] == 4 and keys[0] == keys[1] != keys[2] == keys[3]
    assert not torch.equal(video[0], video[1]) and not torch.equal(video[2], video[3])

    run_pretrain(*overrides, "train.steps=2", f"run_dir={tmp_path / 'run'}")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    proc = run_pretrain(*overrides, "data.repeated_aug=3", f"run_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 2 and not (tmp_path / "bad").exists()
    assert (
        "adamae-pretrain: error: train.micro_batch_size=4: it counts views, data.repeated_aug=3 of each clip"
        in proc.stderr
    )


def test_bench_data_prints_one_json_object_per_format(shards, tmp_path):
    videos = tmp_path / "videos"
    make_videos(videos, 3)
    copy_real(["carphone_distorted.mp4"], videos)
    proc = subprocess.run(
        [
            sys.executable,
            "tools/bench.py",
            "data",
            "--urls",
            str(shards["jpg"]),
            "--urls",
            str(shards["mp4"]),
            "--videos",
            str(videos),
            "--num-workers",
            "0",
            "--clips",
            "4",
            "--warmup",
            "1",
            "--num-frames",
            "4",
            "--img-size",
            "32",
            "--cpu-time",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["clips_per_s_per_worker"]) == set(result["ratio"]) == {"jpg", "mp4"}
    for fmt, rate in result["clips_per_s_per_worker"].items():
        assert rate > 0 and result["ratio"][fmt] == pytest.approx(
            rate / result["baseline_clips_per_s_per_worker"],
            rel=0.01,
            abs=0.006,  # rounded to 2 decimals
        )
    assert result["videos"] == 4 and result["clip"] == [4, 32, 32]
    assert set(result["cpu_ratio"]) == {"jpg", "mp4"} and result["cpu_baseline_clips_per_s"] > 0


@pytest.mark.slow
def test_two_rank_pretrain_from_shards_resumes_bitwise(shards, tmp_path, tiny_run):
    """``torchrun`` with 2 ranks x 2 workers: stop after 4 steps, resume from rank 0's client state, and get
    the uninterrupted run's losses (the stream crosses an epoch boundary after the resume)."""
    common = pretrain_overrides(tiny_run, shards["mp4"]) + ["train.steps=8", "train.micro_batch_size=2"]

    run_torchrun(2, *common, "train.ckpt_every=0", f"run_dir={tmp_path / 'straight'}")
    run_torchrun(2, *common, "train.ckpt_every=4", "train.stop_after=4", f"run_dir={tmp_path / 'stopped'}")
    run_torchrun(2, *common, "train.ckpt_every=4", "train.resume=auto", f"run_dir={tmp_path / 'stopped'}")
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert straight[-1]["data_epoch"] >= 1


def test_missing_or_wrong_urls_fail_before_training_with_one_line(tmp_path, tiny_run):
    base = [o for o in tiny_run if not o.startswith("data=")] + ["data=shards", f"run_dir={tmp_path / 'x'}"]
    proc = run_pretrain(*base, check=False)
    assert proc.returncode == 2 and "adamae-pretrain: error: data.urls is required for data=shards" in proc.stderr
    # A brace pattern is quoted for Hydra's override grammar.
    proc = run_pretrain(*base, f"data.urls='{tmp_path}/shard-{{000000..000003}}.tar'", check=False)
    assert proc.returncode == 2 and "4 shard(s) not found" in proc.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_scales=[]", "data.crop_scales=[]: expected a non-empty list of crop sizes in (0, 1]"),
        (
            "data.crop_scales=[1.0,0.0]",
            "data.crop_scales=[1.0, 0.0]: expected a non-empty list of crop sizes in (0, 1]",
        ),
        ("data.max_distort=-1", "data.max_distort must be an integer >= 0, got -1"),
        ("data.shuffle_buffer=-1", "data.shuffle_buffer must be an integer >= 0, got -1"),
        ("data.corrupt_check_after=-1", "data.corrupt_check_after must be an integer >= 0, got -1"),
    ],
)
def test_bad_augmentation_and_stream_options_fail_the_config_check(shards, tiny_run, override, message):
    from adamae_scale import schema

    base = [o for o in tiny_run if not o.startswith("data=")] + ["data=shards", f"data.urls={shards['jpg']}"]
    schema.validate(schema.compose(base))
    with pytest.raises(ValueError) as refused:  # adamae-pretrain and adamae-finetune print it before starting
        schema.validate(schema.compose([*base, override]))
    assert str(refused.value).startswith(message)
