"""adamae-bench step: timed optimizer steps of the real engine, with the FLOPs they execute."""

import json
import subprocess

import torch
from torch.utils.flop_counter import FlopCounterMode

from adamae_scale.models import build_model, config_for

from .conftest import REPO, cli_env, one_line_error, torchrun_cmd

TINY = [
    "model=vit_tiny",
    "model.depth=2",
    "model.decoder_depth=1",
    "model.num_frames=4",
    "model.img_size=[32,32]",
    "model.patch_size=8",
    "masking.ratio=0.75",
    "train.micro_batch_size=4",
]


def test_bench_step_on_two_zero3_ranks_counts_forward_backward_and_recompute():
    cmd = torchrun_cmd(
        2,
        *TINY,
        "ds=zero3",
        "model.checkpoint_every=1",
        "steps=3",
        "warmup=1",
        target=("-m", "adamae_scale.bench", "step"),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 reports
    report = reports[0]
    cfg = config_for(
        "vit_tiny", depth=2, decoder_depth=1, num_frames=4, img_size=[32, 32], patch_size=8, mask_ratio=0.75
    )
    with torch.device("meta"):
        assert report["params"] == build_model(cfg).num_params()  # the full model, not one ZeRO-3 shard
    assert (report["world_size"], report["micro_batch_size"], report["steps_timed"]) == (2, 4, 3)
    assert abs(report["clips_per_s"] - 8 / report["seconds_per_step"]) < 1e-2 * report["clips_per_s"]
    assert torch.isfinite(torch.tensor(report["loss"]))

    # A training step executes about 3x the forward FLOPs (backward = 2x), plus one more forward of
    # each checkpointed block: the count must land between the two.
    torch.manual_seed(0)
    model = build_model(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 3, 4, 32, 32))
    forward_tflop = counter.get_total_flops() / 1e12
    assert 2.5 * forward_tflop < report["model_tflop_per_step_per_rank"] < 4.5 * forward_tflop


def test_bench_step_rejects_bad_settings_in_one_line(capsys):
    from adamae_scale.bench import main

    for settings, expected in (
        (["model=vit_hug"], "model/vit_hug"),
        (["train.foo=1"], "train.foo"),
        (["steps=0"], "steps"),
        (["fast"], "expected key=value"),
    ):
        assert main(["step", *settings]) == 2
        line = one_line_error(capsys.readouterr().err, "adamae-bench")
        assert line.startswith("adamae-bench: error: step: ") and expected in line
