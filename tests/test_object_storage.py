"""Videos, annotation files and shards in object storage, against a real S3-protocol server (``moto_server`` on
127.0.0.1): shards written to S3 are the local pool's samples byte for byte; training streams them and resumes
exactly; fine-tuning trains and evaluates from S3; each bad input is one line naming the URL; and no output or
file of a run holds the credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from adamae_scale.data import storage
from adamae_scale.data.pipeline import ShardClips, ShardDataConfig, shard_urls
from adamae_scale.data.shards import ShardOptions, build_shards

from .conftest import cli_env, free_port, run_command, run_pretrain
from .services import ACCESS_KEY_ID, SECRET_ACCESS_KEY, CuttingProxy, gcs_emulator, moto_server, s3_env
from .test_pipeline import CLIP, make_videos, pretrain_overrides, summary
from .test_shards import read_tar

SECRETS = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
SMALL = ShardOptions(short_side=32, min_frames=8)
CLI_OPTS = ["--short-side", "32", "--min-frames", "8", "--samples-per-shard", "3", "--no-progress"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, its client environment (set in this process too), and 7 videos in s3://videos/clips."""
    home = tmp_path_factory.mktemp("s3-home")
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        env = s3_env(endpoint, home)
        for key, value in env.items():
            patch.setenv(key, value)
        make_videos(home / "videos", 7)  # 3 classes (sub-folders)
        fs, _ = storage.filesystem("s3://videos")
        fs.mkdir("videos")
        fs.mkdir("shards")
        fs.put(str(home / "videos"), "videos/clips", recursive=True)
        yield {"endpoint": endpoint, "env": env, "home": home}


def shards_cli(*args: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = {k: v for k, v in cli_env(**env).items() if k not in unset}
    return run_command([sys.executable, "-m", "adamae_scale.data.shards_cli", *args], env=full, timeout=240)


def bucket_samples(prefix: str) -> dict[str, dict[str, bytes]]:
    """The samples of the shards under ``prefix`` (any bucket URL), each shard of the size its manifest says."""
    fs, _ = storage.filesystem(prefix)
    manifest = json.loads(fs.cat_file(f"{prefix}/manifest.json"))
    samples: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for shard in manifest["shards"]:
            data = fs.cat_file(f"{prefix}/{shard['name']}")
            assert len(data) == shard["bytes"]
            local = Path(scratch) / shard["name"]
            local.write_bytes(data)
            samples.update(read_tar(local))
    return samples


def assert_no_secrets(*texts: str, folders: tuple[Path, ...] = (), prefixes: tuple[str, ...] = ()) -> None:
    """Neither credential in any text, in any file under ``folders`` or in any object under ``prefixes``."""
    blobs = [t.encode() for t in texts]
    for folder in folders:
        blobs += [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
    for prefix in prefixes:
        fs, path = storage.filesystem(prefix)
        blobs += [fs.cat_file(p) for p in fs.find(path)]
    assert blobs
    for blob in blobs:
        for secret in SECRETS:
            assert secret.encode() not in blob


@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory):
    """``adamae-shards s3://videos/clips s3://shards/mp4``, and the same job from the local videos."""
    proc = shards_cli("s3://videos/clips", "s3://shards/mp4", *CLI_OPTS, "--workers", "2", env=s3["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = tmp_path_factory.mktemp("local-shards")
    opts = ShardOptions(short_side=32, min_frames=8, samples_per_shard=3)
    build_shards(s3["home"] / "videos", local, opts, workers=2, progress=False)
    return {"proc": proc, "local": local}


def stopped_and_resumed(cfg: ShardDataConfig, before: int, after: int) -> list[dict]:
    """``before`` batches of a loader, its state through JSON (as a checkpoint keeps it), then ``after`` batches of
    a new loader resumed from that state."""
    interrupted = ShardClips(cfg, batch_size=2)
    got = [summary(next(interrupted)) for _ in range(before)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    interrupted.close()
    resumed = ShardClips(cfg, batch_size=2)
    resumed.load_state_dict(state)
    got += [summary(next(resumed)) for _ in range(after)]
    resumed.close()
    return got


def test_shards_from_and_to_s3_hold_the_local_pool_s_samples(s3, s3_shards):
    local = s3_shards["local"]
    expected = {}
    for tar in sorted(local.glob("*.tar")):
        expected.update(read_tar(tar))
    assert bucket_samples("s3://shards/mp4") == expected and len(expected) == 7
    manifest = json.loads(storage.read_text("s3://shards/mp4/manifest.json"))
    assert manifest["source"] == "s3://videos/clips" and manifest["complete"]
    assert manifest["label_map"] == json.loads((local / "manifest.json").read_text())["label_map"]
    assert "7 samples in 3 shards in s3://shards/mp4" in s3_shards["proc"].stderr

    # An annotation list in S3 whose paths start at --root, also in S3; one line names a missing video.
    storage.write_bytes_atomic("s3://videos/lists/train.txt", b"class0/v00.mp4 5\nclass1/v01.mp4 6\nnone/x.mp4 1\n")
    log: list[str] = []
    got = build_shards(
        "s3://videos/lists/train.txt",
        "s3://shards/listed",
        ShardOptions(short_side=32, min_frames=8),
        root="s3://videos/clips",
        workers=2,
        progress=False,
        log=log.append,
    )
    assert got["num_samples"] == 2 and [f["reason"] for f in got["failures"]] == ["file not found"]
    assert log == ["adamae-shards: skipped none/x.mp4 (line 3): file not found"]
    assert {json.loads(f["json"])["label"] for f in bucket_samples("s3://shards/listed").values()} == {5, 6}
    assert_no_secrets(s3_shards["proc"].stdout, s3_shards["proc"].stderr, *log, prefixes=("s3://shards",))


def test_training_streams_s3_shards_and_resumes_exactly(s3, s3_shards, capfd):
    urls = shard_urls("s3://shards/mp4/manifest.json")
    assert urls == [f"s3://shards/mp4/shard-{i:06d}.tar" for i in range(3)]
    assert shard_urls("s3://shards/mp4") == urls  # the folder: its manifest
    cfg = ShardDataConfig(urls="s3://shards/mp4", workers=2, shuffle_buffer=4, shuffle_initial=2, **CLIP)
    local = ShardClips(ShardDataConfig(**{**cfg.__dict__, "urls": str(s3_shards["local"])}), batch_size=2)
    straight = ShardClips(cfg, batch_size=2)
    expected = [summary(next(straight)) for _ in range(6)]  # into the second epoch
    straight.close()
    assert [b["key"] for b in expected] == [summary(next(local))["key"] for _ in range(6)]  # the same stream
    local.close()

    assert stopped_and_resumed(cfg, 3, 3) == expected

    # A shard deleted after the run listed it: a line naming it each epoch (it may come back: an open error is not
    # damage), and training goes on with the others.
    fs, _ = storage.filesystem("s3://shards")
    fs.copy("shards/mp4", "shards/gone", recursive=True)
    gone = ShardClips(ShardDataConfig(**{**cfg.__dict__, "urls": "s3://shards/gone", "workers": 1}), batch_size=2)
    fs.rm_file("shards/gone/shard-000001.tar")
    capfd.readouterr()
    keys = [k for _ in range(4) for k in next(gone)["key"]]
    gone.close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "shard-000001.tar" in line]
    expected = [
        "[adamae] data: could not read shard s3://shards/gone/shard-000001.tar (FileNotFoundError: "
        f"s3://shards/gone/shard-000001.tar: not found): skipped in epoch {epoch}, read again in the next"
        for epoch in range(len(lines))
    ]
    assert lines and lines == expected, err
    assert len(set(keys)) == 4 and gone.corrupt == 0 and gone.unreadable == {}


def test_fine_tuning_reads_its_classes_and_evaluates_from_s3(s3, s3_shards):
    from types import SimpleNamespace

    from adamae_scale.data import ShardData
    from adamae_scale.finetune.run import num_classes
    from adamae_scale.finetune.shard_views import rank_videos

    config = SimpleNamespace(num_classes=None, data=ShardData(urls="s3://shards/mp4"))  # what num_classes reads
    assert num_classes(config) == 3  # the manifest's label map
    views = lambda urls: [  # noqa: E731
        (item.key, item.label, item.views.sum().item()) for item in rank_videos(urls, 0, 1, 4, (32, 32), 2, 2, 1, [])
    ]
    remote = views("s3://shards/mp4/manifest.json")
    assert len(remote) == 7 and remote == views(str(s3_shards["local"]))


@pytest.mark.slow  # a whole fine-tuning run
def test_finetune_trains_and_evaluates_from_s3(s3, s3_shards, tmp_path):
    from .test_finetune import TINY_FT, run_finetune

    run_dir = tmp_path / "run"
    os.environ.update(s3["env"])  # already set in this process by the fixture: the subprocess inherits it
    proc = run_finetune(
        *[o for o in TINY_FT if not o.startswith(("data.", "eval.videos"))],
        "model=vit_tiny",
        "model.depth=1",
        "model.num_frames=4",
        "model.img_size=[32,32]",
        "model.patch_size=8",
        "data=shards",
        "data.urls=s3://shards/mp4",
        "data.val_urls=s3://shards/mp4/manifest.json",
        "data.sampling_rate=2",
        "data.workers=1",
        "train.steps=2",
        "eval.temporal_views=1",
        "eval.spatial_views=1",
        f"run_dir={run_dir}",
    )
    assert "3 classes" in proc.stdout  # the label map of the manifest in S3
    assert json.loads((run_dir / "eval.json").read_text())["videos"] == 7
    assert_no_secrets(proc.stdout, proc.stderr, folders=(run_dir,))


def one_line(proc: subprocess.CompletedProcess, prog: str = "adamae-shards") -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    assert_no_secrets(proc.stdout, proc.stderr)
    return lines[0]


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``adamae-shards ARGS`` in this process: (exit status, its one error line)."""
    from adamae_scale.data.shards_cli import main

    status = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("adamae-shards: error: "), err
    assert_no_secrets(err)
    return status, lines[0]


def test_bad_storage_is_one_line_naming_the_url(s3, monkeypatch, capsys):
    import s3fs

    fs, _ = storage.filesystem("s3://shards")
    fs.pipe({"shards/unmerged/shard-000000.tar": b"", "shards/unmerged/parts/part-00000-of-00002.json": b"{}"})
    with pytest.raises(ValueError, match=r"^data.urls=s3://shards/unmerged: has parts/ .* run `adamae-shards merge"):
        shard_urls("s3://shards/unmerged")
    status, line = run_main(capsys, "s3://videos/clips", "s3://no-such-bucket/out", *CLI_OPTS)
    assert status == 2 and "s3://no-such-bucket/out: the bucket 'no-such-bucket' does not exist" in line
    with pytest.raises(ValueError) as err:  # adamae-pretrain prints it as its one error line
        shard_urls("s3://no-such-bucket/shards")
    assert str(err.value) == (
        "data.urls=s3://no-such-bucket/shards: the bucket 'no-such-bucket' does not exist "
        "(or these credentials cannot see it)"
    )

    # A server that checks credentials: ours are unknown to it.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as strict:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict)
        s3fs.S3FileSystem.clear_instance_cache()  # clients are cached with the endpoint they were made for
        try:
            status, line = run_main(capsys, "s3://videos/clips", "s3://shards/x", *CLI_OPTS)
        finally:
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
            s3fs.S3FileSystem.clear_instance_cache()
    assert status == 2 and "s3://videos/clips: permission denied" in line


@pytest.mark.slow  # each waits out the storage library's own retries (~10 s)
def test_unreachable_endpoint_and_missing_credentials_are_one_line(s3):
    env = s3["env"]
    closed = f"http://127.0.0.1:{free_port()}"
    proc = shards_cli("s3://videos/clips", "s3://shards/x", *CLI_OPTS, env={**env, "AWS_ENDPOINT_URL": closed})
    assert proc.returncode == 2
    assert f"s3://videos/clips: cannot reach the storage endpoint {closed}" in one_line(proc)

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    proc = shards_cli("s3://videos/clips", "s3://shards/x", *CLI_OPTS, env=env, unset=keys)
    assert proc.returncode == 2 and "s3://videos/clips: no usable credentials" in one_line(proc)


def test_a_download_cut_mid_stream_is_resumed_where_it_broke(s3, monkeypatch):
    import s3fs

    blob = os.urandom(3 << 20)
    storage.write_bytes_atomic("s3://shards/blob.bin", blob)
    # More cuts in a row than the S3 client retries by itself: the reader reopens the object where it broke.
    proxy = CuttingProxy(int(s3["endpoint"].rsplit(":", 1)[1]), cut_after=200_000, cuts=8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()  # clients are cached with the endpoint they were made for
    try:
        with storage.open_read("s3://shards/blob.bin") as f:
            got = f.read()
            reopened = f.raw.retries
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.cuts == 8 and reopened >= 1 and got == blob


@pytest.mark.slow  # three pre-training runs
def test_pretrain_from_s3_stops_and_resumes_exactly(s3, s3_shards, tmp_path, tiny_run):
    from adamae_scale.metrics import read_metrics

    common = pretrain_overrides(tiny_run, "s3://shards/mp4/manifest.json")
    env = cli_env(**s3["env"])
    run_pretrain(*common, "train.ckpt_every=0", f"run_dir={tmp_path / 'straight'}", env=env)
    stopped = tmp_path / "stopped"
    first = run_pretrain(*common, "train.ckpt_every=3", "train.stop_after=3", f"run_dir={stopped}", env=env)
    second = run_pretrain(*common, "train.ckpt_every=3", "train.resume=auto", f"run_dir={stopped}", env=env)
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert losses(stopped) == losses(tmp_path / "straight") and len(losses(stopped)) == 6
    assert_no_secrets(first.stdout, first.stderr, second.stdout, second.stderr, folders=(tmp_path,))


def test_shards_to_gcs_and_a_stream_from_them_that_resumes_exactly(s3, s3_shards, tmp_path, tiny_run):
    """gs:// through gcsfs, against a real GCS emulator on 127.0.0.1: ``adamae-shards`` writes the local pool's
    samples byte for byte, the loader streams them (the same stream as from the local shards) and resumes
    exactly, and pre-training reads them by the folder's URL."""
    with gcs_emulator("gshards") as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        videos = str(s3["home"] / "videos")
        proc = shards_cli(videos, "gs://gshards/mp4", *CLI_OPTS, "--workers", "2", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = {}
        for tar in sorted(s3_shards["local"].glob("*.tar")):
            expected.update(read_tar(tar))
        assert bucket_samples("gs://gshards/mp4") == expected and len(expected) == 7
        assert "7 samples in 3 shards in gs://gshards/mp4" in proc.stderr

        cfg = ShardDataConfig(urls="gs://gshards/mp4", workers=2, shuffle_buffer=4, shuffle_initial=2, **CLIP)
        local = ShardClips(ShardDataConfig(**{**cfg.__dict__, "urls": str(s3_shards["local"])}), batch_size=2)
        expected_stream = [summary(next(local)) for _ in range(5)]  # into the second epoch
        local.close()
        assert stopped_and_resumed(cfg, 2, 3) == expected_stream

        run_dir = tmp_path / "from-gcs"
        overrides = [*pretrain_overrides(tiny_run, "gs://gshards/mp4"), "train.steps=2", "train.ckpt_every=0"]
        run_pretrain(*overrides, f"run_dir={run_dir}", env=cli_env(**env))
        assert (run_dir / "summary.json").is_file()


def test_an_annotation_file_and_its_videos_over_http(s3, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = s3["home"] / "videos"
    (served / "train.txt").write_text("class0/v00.mp4 0\nclass1/v01.mp4 1\nclass2/missing.mp4 2\n")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train.txt"
        log: list[str] = []
        got = build_shards(
            url, tmp_path / "out", ShardOptions(short_side=32, min_frames=8), progress=False, log=log.append
        )
    finally:
        server.shutdown()
        server.server_close()
    assert got["num_samples"] == 2 and got["source"] == url
    assert log == ["adamae-shards: skipped class2/missing.mp4 (line 3): file not found"]
    local = build_shards(
        served / "train.txt",
        tmp_path / "local",
        ShardOptions(short_side=32, min_frames=8),
        progress=False,
        log=lambda _: None,
    )
    assert read_tar(tmp_path / "out" / got["shards"][0]["name"]) == read_tar(
        tmp_path / "local" / local["shards"][0]["name"]
    )
