"""``engine=fairscale`` on 2 CPU ranks (gloo): the OSS+SDP loss curve against DeepSpeed ZeRO-2's, exact resume,
consolidation of its checkpoints, activation checkpointing through fairscale's wrapper, and one-line errors.

Three 2-rank runs are shared by every test here (``runs``): DeepSpeed ZeRO-2, fairscale OSS+SDP (every block
checkpointed, inputs offloaded; the live weights dumped at the end) and a fairscale resume from the second run's
step-5 checkpoint, launched as a user would: ``torchrun ... -m adamae_scale.pretrain engine=fairscale``.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adamae_scale import pretrain, schema
from adamae_scale.engine import engines, fairscale_engine
from adamae_scale.engine.checkpoint import CheckpointRef, NoUsableCheckpoint, verify
from adamae_scale.metrics import read_metrics
from adamae_scale.models import build_model

from .conftest import (
    REPO,
    TINY_RUN,
    checkpointing_config,
    cli_env,
    convert_cli,
    one_line_error,
    run_pretrain,
    run_torchrun,
    torchrun_cmd,
)

# Same global batch (2 ranks x 2 clips) for both engines; sampler dropout off so every random draw is keyed by
# the sample's position in the stream.
COMMON = [
    *TINY_RUN,
    "model.sampler_dropout=0.0",
    "precision=fp32",
    "eval.focus_batches=0",
    "train.micro_batch_size=2",
    "train.steps=10",
    "train.ckpt_every=5",
]
FAIRSCALE = ["engine=fairscale", "engine.sharding=oss_sdp", "model.checkpoint_every=1", "model.checkpoint_offload=true"]
RTOL = 1e-4  # as tests/test_scale.py: fp32 sums in another order differ in the last bits

# adamae-pretrain, plus the live module's weights written by rank 0 once training is over (the reference for
# consolidate).
LIVE_WEIGHTS_SCRIPT = """
import os

from safetensors.torch import save_file

import adamae_scale.pretrain as pretrain


class LiveWeightsTrainer(pretrain.Trainer):
    def fit(self, stop_after=None):
        last = super().fit(stop_after)
        if self.rank == 0:
            live = {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
            save_file(live, os.environ["ADAMAE_LIVE_WEIGHTS"])
        return last


pretrain.Trainer = LiveWeightsTrainer
pretrain.main()
"""


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairscale")
    run_torchrun(2, *COMMON, "ds=zero2", f"run_dir={root / 'deepspeed'}")

    script = root / "pretrain_live_weights.py"
    script.write_text(LIVE_WEIGHTS_SCRIPT)
    live = root / "live.safetensors"
    cmd = torchrun_cmd(2, *COMMON, *FAIRSCALE, f"run_dir={root / 'fairscale'}", target=(str(script),))
    proc = subprocess.run(
        cmd, cwd=REPO, env=cli_env(ADAMAE_LIVE_WEIGHTS=str(live)), capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-6000:]

    step5 = root / "fairscale" / "checkpoints" / "step_00000005"
    resumed = run_torchrun(2, *COMMON, *FAIRSCALE, f"train.resume={step5}", f"run_dir={root / 'resumed'}")
    return {
        "deepspeed": root / "deepspeed",
        "fairscale": root / "fairscale",
        "resumed": root / "resumed",
        "live": live,
        "resumed_stdout": resumed.stdout,
    }


def test_oss_sdp_loss_curve_equals_deepspeed_zero2(runs):
    reference = read_metrics(runs["deepspeed"] / "metrics.jsonl")
    records = read_metrics(runs["fairscale"] / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    np.testing.assert_allclose(losses(runs["fairscale"]), [r["loss"] for r in reference], rtol=RTOL)
    # The gradient norm over both ranks, before clipping (train.clip_grad=1.0 clips the first steps).
    np.testing.assert_allclose([r["grad_norm"] for r in records], [r["grad_norm"] for r in reference], rtol=RTOL)
    assert losses(runs["fairscale"])[-1] < losses(runs["fairscale"])[0]  # it trains


def test_resume_is_bit_exact_and_the_cli_runs_under_torchrun(runs):
    assert f"done: 10 steps, results in {runs['resumed']}" in runs["resumed_stdout"]
    records = read_metrics(runs["resumed"] / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6, 11))
    assert [r["loss"] for r in records] == losses(runs["fairscale"])[5:]  # exactly
    final = {name: runs[name] / "checkpoints" / "step_00000010" for name in ("fairscale", "resumed")}
    weights = {name: load_file(folder / fairscale_engine.MODEL_FILE) for name, folder in final.items()}
    assert weights["fairscale"].keys() == weights["resumed"].keys()
    assert all(torch.equal(weights["resumed"][k], v) for k, v in weights["fairscale"].items())
    for rank in range(2):  # each rank's AdamW moments, bit for bit
        shards = [
            torch.load(f / fairscale_engine.OPTIM_FILE.format(rank), weights_only=True)["optimizer"]["state"]
            for f in final.values()
        ]
        assert shards[0].keys() == shards[1].keys() and shards[0]
        assert all(torch.equal(shards[1][i][k], t) for i, state in shards[0].items() for k, t in state.items())


def test_checkpoints_are_complete_and_say_which_engine_wrote_them(runs):
    tag = runs["fairscale"] / "checkpoints" / "step_00000010"
    assert (runs["fairscale"] / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert verify(tag) is None  # manifest.json covers every file, sha256 included
    names = {p.name for p in tag.iterdir()}
    assert {"config.json", "manifest.json", "fairscale.json", "model.safetensors", "client_state.json"} <= names
    assert {"optim_rank_00000.pt", "optim_rank_00001.pt"} <= names
    meta = fairscale_engine.read_meta(tag)
    assert meta["sharding"] == "oss_sdp" and meta["world_size"] == 2
    assert json.loads((tag / "client_state.json").read_text())["step"] == 10
    schema.check_resume(str(tag))  # train.resume=FOLDER accepts it
    # Each engine refuses the other's checkpoints in one line, before loading anything.
    deepspeed_tag = runs["deepspeed"] / "checkpoints" / "step_00000005"
    for spec, ref in (
        (
            engines.EngineSpec(micro_batch_size=4, name="fairscale", sharding="oss_sdp"),
            CheckpointRef(deepspeed_tag.parent, "step_00000005", {"world_size": 2}),
        ),
        (
            engines.EngineSpec(micro_batch_size=4, name="deepspeed", ds="zero2"),
            CheckpointRef(tag.parent, tag.name, {"world_size": 2}),
        ),
    ):
        with pytest.raises(NoUsableCheckpoint, match="was written by engine="):
            engines.backend(spec, world_size=2).resume_from(ref, 2, True)


def test_consolidate_of_a_fairscale_checkpoint_is_bit_identical_to_the_live_model(runs, tmp_path, capsys):
    code, _, err = convert_cli(capsys, "consolidate", runs["fairscale"], tmp_path / "out")
    assert code == 0, err
    written = load_file(tmp_path / "out" / "model.safetensors")
    live = load_file(runs["live"])
    assert written.keys() == live.keys()
    assert all(written[k].dtype == torch.float32 and torch.equal(written[k], v) for k, v in live.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "adamae-full" and config["model"]["depth"] == 2
    assert config["source"]["kind"] == "fairscale" and config["source"]["sharding"] == "oss_sdp"
    assert config["source"]["tag"] == "step_00000010"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoint_wrapper_gives_equal_gradients(precision):
    """fairscale's ``checkpoint_wrapper`` (through ``checkpoint_blocks``, with and without offloading the inputs)
    recomputes exactly what the plain forward computed, bf16 autocast included: the same gradients, bit for bit."""
    cfg = checkpointing_config()
    video = torch.randn(2, 3, 4, 32, 32)
    noise = torch.rand(2, cfg.num_tokens)
    grads = []
    for every, offload in ((0, False), (1, False), (2, True)):
        torch.manual_seed(0)
        model = build_model(cfg)
        wrapped = fairscale_engine.checkpoint_blocks(model.blocks(), every, offload_to_cpu=offload)
        assert wrapped == {0: 0, 1: 5, 2: 3}[every]
        torch.manual_seed(1)  # the same drop-path draws: the recomputation must replay them
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(video, noise=noise)
        (out.pred.float().square().mean() + out.log_probs.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert list(grads[1]) == list(grads[0])  # parameter names unchanged
    for other in grads[1:]:
        assert all(torch.equal(other[name], grad) for name, grad in grads[0].items())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["engine=foo"], "Could not find 'engine/foo' (available: deepspeed, fairscale)"),
        (["engine=fairscale", "engine.sharding=zero2"], "engine.sharding='zero2': expected one of"),
        (["engine=fairscale", "ds=zero3"], "ds=zero3: DeepSpeed's ZeRO-3 and offload do not apply to engine=fairscale"),
        (["engine=fairscale", "ds=zero3_offload"], "ds=zero3_offload: DeepSpeed's ZeRO-3 and offload do not apply"),
        (
            ["model.checkpoint_every=1", "model.checkpoint_offload=true"],
            "checkpoint_offload=true needs engine=fairscale",
        ),
        (["engine=fairscale", "model.checkpoint_offload=true"], "set model.checkpoint_every"),
    ],
)
def test_bad_engine_settings_are_one_line_errors(overrides, expected, tmp_path):
    with pytest.raises(ValueError) as err:
        schema.validate(schema.compose([*TINY_RUN, *overrides, f"run_dir={tmp_path / 'x'}"]))
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_fsdp_on_the_cpu_fails_before_any_process_starts(tmp_path, monkeypatch, capsys):
    """What ``adamae-pretrain`` runs first (``main``, before Hydra and any process group), in this process."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    overrides = [*TINY_RUN, "engine=fairscale", "engine.sharding=fsdp", f"run_dir={tmp_path / 'x'}"]
    monkeypatch.setattr(sys, "argv", ["adamae-pretrain", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main()
    assert exit_info.value.code == 2
    assert one_line_error(capsys.readouterr().err, "adamae-pretrain") == (
        "adamae-pretrain: error: engine.sharding=fsdp: fairscale's FullyShardedDataParallel does not run on the "
        "CPU; use engine.sharding=oss_sdp (≈ ZeRO-2) or oss (≈ ZeRO-1) here"
    )
    assert not (tmp_path / "x").exists()


# -- longer checks (make test-slow) ----------------------------------------------------------------------------
@pytest.mark.slow
def test_oss_with_ddp_equals_deepspeed_zero2_and_resumes_on_one_rank(runs, tmp_path):
    """ZeRO-1's equivalent (OSS, gradients all-reduced by DDP), and an elastic resume: the 2-rank OSS+SDP
    checkpoint continued on one rank (OSS re-partitions the saved optimizer state)."""
    run_torchrun(2, *COMMON, "engine=fairscale", "engine.sharding=oss", f"run_dir={tmp_path / 'oss'}")
    np.testing.assert_allclose(losses(tmp_path / "oss"), losses(runs["deepspeed"]), rtol=RTOL)
    step5 = runs["fairscale"] / "checkpoints" / "step_00000005"
    one_rank = [a for a in COMMON if not a.startswith("train.micro_batch_size")]
    run_pretrain(
        *one_rank,
        "train.micro_batch_size=4",
        "engine=fairscale",
        f"train.resume={step5}",
        f"run_dir={tmp_path / 'one'}",
    )
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(runs["fairscale"])[5:], rtol=RTOL)


@pytest.mark.slow
def test_the_issue_command_runs_under_torchrun(tmp_path):
    """``adamae-pretrain engine=fairscale model=vit_tiny data=synthetic train.steps=20`` as written (full ViT-Tiny
    clips: 16 x 224², 2 ranks); the default twin is the tiny-model resume in ``runs``."""
    run_dir = tmp_path / "run"
    proc = run_torchrun(
        2, "engine=fairscale", "model=vit_tiny", "data=synthetic", "train.steps=20", f"run_dir={run_dir}", timeout=1800
    )
    assert f"done: 20 steps, results in {run_dir}" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 21))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"


@pytest.mark.gpu
def test_fsdp_trains_resumes_and_consolidates_on_cuda(tmp_path, capsys):
    """ZeRO-3's equivalent (one CUDA rank: FSDP's code path without sharding), bf16 with checkpointed blocks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on a GPU machine with -m gpu)")
    env = cli_env(DS_ACCELERATOR="cuda")
    common = [
        *TINY_RUN,
        "engine=fairscale",
        "engine.sharding=fsdp",
        "precision=bf16",
        "model.checkpoint_every=1",
        "model.sampler_dropout=0.0",
        "eval.focus_batches=0",
        "train.steps=6",
        "train.ckpt_every=3",
    ]
    run_pretrain(*common, f"run_dir={tmp_path / 'straight'}", env=env)
    run_pretrain(*common, "train.stop_after=3", f"run_dir={tmp_path / 'stopped'}", env=env)
    run_pretrain(*common, f"run_dir={tmp_path / 'stopped'}", env=env)
    np.testing.assert_allclose(losses(tmp_path / "stopped"), losses(tmp_path / "straight"), rtol=1e-3)
    code, _, err = convert_cli(capsys, "consolidate", tmp_path / "stopped", tmp_path / "out")
    assert code == 0, err
    written = load_file(tmp_path / "out" / "model.safetensors")
    saved = load_file(tmp_path / "stopped" / "checkpoints" / "step_00000006" / "model.safetensors")
    assert written.keys() == saved.keys() and all(torch.equal(written[k], v) for k, v in saved.items())
