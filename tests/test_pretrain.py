"""``adamae-pretrain`` end to end with a real DeepSpeed engine: metrics, TensorBoard, checkpoints,
resume, and errors that stop before any process group starts."""

import json
import re
import sys

import pytest

from adamae_scale import schema
from adamae_scale.engine import setup
from adamae_scale.metrics import read_metrics

from .conftest import cli_env, run_pretrain


def test_pretrain_logs_checkpoints_and_resumes(tmp_path, tiny_run):
    run_dir = tmp_path / "run"
    extensions = tmp_path / "torch_extensions"  # empty: any C++ op DeepSpeed compiles would land here
    proc = run_pretrain(
        *tiny_run,
        "precision=bf16",
        "train.steps=12",
        "train.ckpt_every=6",
        "eval.pictures=2",
        f"run_dir={run_dir}",
        env=cli_env(TORCH_EXTENSIONS_DIR=str(extensions)),
    )
    # DeepSpeed's CPU shared-memory op (inference all-reduce only) is not compiled: ~1 minute saved per checkout.
    assert not (extensions / "deepspeed_shm_comm").exists() and "built successfully" not in proc.stdout
    assert "focus_ratio" in proc.stdout and str(run_dir) in proc.stdout
    assert "ds=auto → zero0: one rank" in proc.stdout  # the default on one rank: no ZeRO bookkeeping
    # bf16 on a CPU that emulates it (AVX2 only) is many times slower than fp32: the run says so at start.
    assert ("[adamae] warning: precision=bf16 on this CPU" in proc.stdout) is not setup.native_bf16("cpu")
    assert "where the sampler looks (2 held-out clips; rows: input, p, visible, reconstruction, error)" in proc.stdout
    for name in ("clip-0", "clip-1"):  # the adamae-visualize picture of held-out clips, ground truth outlined
        assert all((run_dir / "visualize" / f"{name}.{ext}").is_file() for ext in ("png", "gif", "json"))
    focus = json.loads((run_dir / "visualize" / "clip-0.json").read_text())["focus"]
    assert "ground_truth" in focus and "top_moving" in focus

    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "loss_rec", "loss_sampling", "lr", "clips_per_s", "focus_ratio"):
        assert all(key in r for r in records), key
    first, last = records[0]["loss_rec"], min(r["loss_rec"] for r in records[-3:])
    assert last < first * 0.9, f"loss did not fall: {first} -> {last}"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    assert (ckpts / "step_00000006").is_dir() and (ckpts / "step_00000012").is_dir()
    config = json.loads((ckpts / "step_00000012" / "config.json").read_text())
    assert config["model"]["embed_dim"] == 192 and config["model"]["depth"] == 2
    assert config["ds"] == "zero0"  # the stage auto chose, so a resume keeps it

    proc = run_pretrain(
        *tiny_run, "precision=bf16", "train.steps=16", "train.ckpt_every=6", "train.resume=auto", f"run_dir={run_dir}"
    )
    assert "ds=auto → zero0: the stage the resumed checkpoint was written with" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 12 and summary["steps"] == 16
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 13)) + [13, 14, 15, 16]
    assert (ckpts / "latest").read_text().strip() == "step_00000016"


def test_bad_config_fails_before_training_with_one_line(tmp_path, tiny_run):
    proc = run_pretrain(*tiny_run, "precision=fp16", f"run_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2
    assert "precision='fp16': expected one of ('fp32', 'bf16')" in proc.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()

    # The same checks in process (schema.validate is what the command runs first): one line each.
    for override, expected in (("ds=zero7", "ds='zero7'"), ("model.img_size=[30,32]", "multiple of patch_size")):
        with pytest.raises(ValueError, match=re.escape(expected)):
            schema.validate(schema.compose([*tiny_run, override, f"run_dir={tmp_path / 'y'}"]))


def test_bf16_warning_names_the_device_and_the_remedy_only_where_bf16_is_emulated(monkeypatch, capsys):
    monkeypatch.setattr(setup, "native_bf16", lambda device_type: False)
    warning = setup.slow_bf16_warning("bf16", "cpu")
    assert warning is not None and "precision=bf16 on this CPU (" in warning and "pass precision=fp32" in warning
    assert "compute capability below 8.0" in (setup.slow_bf16_warning("bf16", "cuda") or "")
    assert setup.slow_bf16_warning("fp32", "cpu") is None
    setup.warn_if_slow_bf16("bf16", file=sys.stderr)
    setup.warn_if_slow_bf16("fp32")
    printed = capsys.readouterr()
    assert printed.err == warning + "\n" and printed.out == ""
    monkeypatch.setattr(setup, "native_bf16", lambda device_type: True)
    assert setup.slow_bf16_warning("bf16", "cpu") is None
    setup.warn_if_slow_bf16("bf16")
    assert capsys.readouterr().out == ""
