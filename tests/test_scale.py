"""Scale-out with real DeepSpeed engines on 2 CPU ranks (gloo): ZeRO 1-3 world-size invariance,
gradient accumulation, activation checkpointing, CPU offload, elastic resume, pre-emption, a killed
rank, and a simulated 2-node launch."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adamae_scale.engine.setup import apply_activation_checkpointing
from adamae_scale.metrics import read_metrics
from adamae_scale.models import build_model

from .conftest import (
    REPO,
    TINY_RUN,
    checkpointing_config,
    cli_env,
    free_port,
    run_dumping_state,
    run_pretrain,
    run_ranks,
    torchrun_cmd,
)

# Same global batch of 4 whatever the layout; sampler dropout off so every random draw is keyed by
# the sample's position in the stream (masks) rather than by the rank that processes it.
INVARIANT = [
    *TINY_RUN,
    "model.sampler_dropout=0.0",
    "precision=fp32",
    "eval.focus_batches=0",
    "train.steps=4",
    "train.ckpt_every=0",
]
MICRO = {1: "train.micro_batch_size=4", 2: "train.micro_batch_size=2"}
# fp32 sums in another order (per-rank partial means, ZeRO reduce-scatter) differ in the last bits;
# over a few steps at a high learning rate that stays far below 1e-4 relative.
RTOL = 1e-4


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def zero3_two_ranks(tmp_path_factory):
    """The loss curve of the 2-rank ZeRO-3 run two tests compare against (run once per module)."""
    run_dir = tmp_path_factory.mktemp("zero3_ranks2")
    run_ranks(2, *INVARIANT, "ds=zero3", MICRO[2], f"run_dir={run_dir}")
    return losses(run_dir)


# ZeRO-1 and ZeRO-2 share DeepSpeed's stage-1/2 optimizer, which the default suite also runs on 2 ranks in the
# accumulation, elastic resume and engine comparison tests: only ZeRO-3 runs by default, the others with the slow tests.
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) for s in ("zero1", "zero2")] + ["zero3"])
def test_one_and_two_ranks_give_the_same_loss_curve(tmp_path, request, stage):
    curves = {}
    for ranks in (1, 2):
        if (ranks, stage) == (2, "zero3"):
            curves[ranks] = request.getfixturevalue("zero3_two_ranks")
            continue
        run_dir = tmp_path / f"ranks{ranks}"
        run_ranks(ranks, *INVARIANT, f"ds={stage}", MICRO[ranks], f"run_dir={run_dir}")
        curves[ranks] = losses(run_dir)
    assert len(curves[1]) == 4
    np.testing.assert_allclose(curves[2], curves[1], rtol=RTOL)
    assert curves[1][-1] < curves[1][0]  # it trains


def test_accumulation_is_the_same_as_a_bigger_micro_batch(tmp_path):
    run_pretrain(*INVARIANT, "ds=zero2", "train.micro_batch_size=4", f"run_dir={tmp_path / 'big'}")
    run_pretrain(
        *INVARIANT, "ds=zero2", "train.micro_batch_size=2", "train.accumulation=2", f"run_dir={tmp_path / 'accum'}"
    )
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "big"), rtol=RTOL)


def test_activation_checkpointing_gives_equal_gradients():
    cfg = checkpointing_config()
    video = torch.randn(2, 3, 4, 32, 32)
    noise = torch.rand(2, cfg.num_tokens)
    grads = []
    for every in (0, 1, 2):
        torch.manual_seed(0)
        model = build_model(cfg)
        wrapped = apply_activation_checkpointing(model.blocks(), every)
        assert wrapped == {0: 0, 1: 5, 2: 3}[every]
        torch.manual_seed(1)  # same dropout / drop-path draws; checkpointing must replay them
        out = model(video, noise=noise)
        (out.pred.square().mean() + out.log_probs.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert [n for n, _ in model.named_parameters()] == list(grads[0])  # names unchanged
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # four ranks' launches; the default twins: the gradient check above and the 1-rank one below
def test_activation_checkpointing_with_zero3_and_bf16(tmp_path):
    common = [*INVARIANT, "ds=zero3", "precision=bf16", MICRO[2]]
    run_ranks(2, *common, f"run_dir={tmp_path / 'plain'}")
    run_ranks(2, *common, "model.checkpoint_every=1", f"run_dir={tmp_path / 'ckpt'}")
    np.testing.assert_allclose(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), rtol=1e-5)


def test_activation_checkpointing_with_zero3_and_decoder_masking_on_one_rank(tmp_path):
    # ZeRO-3 partitions on one rank too (each block's weights are gathered for its recompute and released again).
    # fp32: bf16 is emulated on an AVX2-only CPU, several times slower; the 2-rank test above runs it in bf16.
    common = [*INVARIANT, "ds=zero3", MICRO[1], "masking.decoder_ratio=0.5"]
    run_pretrain(*common, f"run_dir={tmp_path / 'plain'}")
    run_pretrain(*common, "model.checkpoint_every=1", f"run_dir={tmp_path / 'ckpt'}")
    np.testing.assert_allclose(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), rtol=1e-5)
    assert losses(tmp_path / "ckpt")[-1] < losses(tmp_path / "ckpt")[0]


def test_zero3_cpu_offload_trains_like_zero3(tmp_path, zero3_two_ranks):
    run_ranks(2, *INVARIANT, "ds=zero3_offload", MICRO[2], f"run_dir={tmp_path / 'offload'}")
    # Offloaded, the update runs on the CPU partitions (on a CPU-only machine in torch's fused AdamW, next to
    # GPUs in DeepSpeed's CPU Adam, which rounds differently).
    np.testing.assert_allclose(losses(tmp_path / "offload"), zero3_two_ranks, rtol=1e-3)


ELASTIC = [*INVARIANT, "ds=zero2", "train.steps=6", "train.ckpt_every=3"]


def resume_on_another_world_size(run_dir, first: int, second: int) -> None:
    """Train on ``first`` ranks to a checkpoint at step 3, resume it on ``second`` ranks; the second run's fp32
    master weights and AdamW moments are the first run's, re-sharded, not recomputed: bit for bit."""
    saved, loaded = {}, {}
    for ranks, state in ((first, saved), (second, loaded)):
        # The first run checkpoints at step 3 and dumps what it saved; the second resumes on the other
        # world size and, with nothing left to train, dumps what it loaded.
        dumps = {
            "master": run_dir / f"master{ranks}.safetensors",
            "optimizer": run_dir / f"adam{ranks}.safetensors",
        }
        run_dumping_state(
            ranks,
            dumps["master"],
            *ELASTIC,
            MICRO[ranks],
            "train.stop_after=3",
            f"run_dir={run_dir}",
            optimizer=dumps["optimizer"],
        )
        state.update(load_file(dumps["master"]), **load_file(dumps["optimizer"]))
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 3
    assert (run_dir / "checkpoints" / "step_00000003_universal").is_dir()
    assert saved.keys() == loaded.keys() and any(k.endswith(".exp_avg_sq") for k in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_the_same_states(tmp_path):
    resume_on_another_world_size(tmp_path / "from2to1", 2, 1)


@pytest.mark.slow  # a default twin above: the re-sharded states, without the runs to the end
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_elastic_resume_across_world_sizes(tmp_path, first, second):
    run_ranks(2, *ELASTIC, MICRO[2], f"run_dir={tmp_path / 'straight'}")
    reference = losses(tmp_path / "straight")
    run_dir = tmp_path / f"from{first}to{second}"
    resume_on_another_world_size(run_dir, first, second)
    run_ranks(second, *ELASTIC, MICRO[second], f"run_dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    np.testing.assert_allclose(losses(run_dir), reference, rtol=RTOL)


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "precision=fp32", "ds=zero1", "train.steps=400", "train.ckpt_every=0", f"run_dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamae_scale.pretrain", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in out and "run the same command again to resume" in out
    stopped_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    run_pretrain(*args[:-2], "train.steps=" + str(stopped_at + 2), "train.ckpt_every=0", f"run_dir={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == stopped_at


@pytest.mark.slow  # two 2-rank launches; the default twins: SIGTERM above, kill -9 in test_reliability.py
def test_killed_rank_fails_the_launch_and_the_rerun_resumes(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        "precision=fp32",
        "ds=zero2",
        MICRO[2],
        "train.steps=40",
        "train.ckpt_every=4",
        "model.depth=1",
        "eval.focus_batches=0",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        torchrun_cmd(2, *args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(run_dir, 9, proc)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert rank1, "rank 1 not found"
    os.kill(rank1[0].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "FAILED" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]

    latest = (run_dir / "checkpoints" / "latest").read_text()
    saved = int(latest.split("_")[1])
    assert saved >= 8
    rerun = subprocess.run(torchrun_cmd(2, *args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == saved and summary["steps"] == 40


def test_simulated_two_node_launch_with_the_torchrun_recipe(tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        env = cli_env(
            NNODES="2",
            NODE_RANK=node_rank,
            NPROC_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHON=sys.executable,
        )
        nodes.append(
            subprocess.Popen(
                ["bash", "tools/launch/torchrun.sh", *INVARIANT, "ds=zero3", MICRO[2], f"run_dir={run_dir}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
        outputs.append(out)
    assert "world 2" in outputs[0]  # node 0 hosts global rank 0, which reports the layout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def wait_for_step(run_dir, step: int, proc, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s")
