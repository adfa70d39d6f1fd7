"""What a long run meets: divergence, damaged checkpoints, resumed metrics, a full disk, bad input, kill -9.

Every run is a real ``adamae-pretrain`` process with a real DeepSpeed engine on the tiny model."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adamae_scale import schema
from adamae_scale.bench.step import compose
from adamae_scale.engine.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointRef,
    NoUsableCheckpoint,
    to_universal,
    verify,
)
from adamae_scale.engine.guard import GuardedAdamW
from adamae_scale.engine.trainer import Trainer, TrainPlan
from adamae_scale.metrics import MetricsLogger, read_metrics

from .conftest import REPO, TINY_RUN, cli_env, convert_cli, one_line_error, run_command, run_pretrain, run_torchrun

FP32 = [*TINY_RUN, "precision=fp32", "eval.focus_batches=0"]
FULL_DISK_SCRIPT = Path(__file__).with_name("pretrain_with_full_disk.py")


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("adamae-pretrain: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def rewind(ckpts: Path, to_step: int) -> None:
    """Make the checkpoint of ``to_step`` the newest, as if the run had died right after saving it."""
    for tag in sorted(ckpts.glob("step_*")):
        if int(tag.name[5:13]) > to_step:
            shutil.rmtree(tag)
    (ckpts / "latest").write_text(f"step_{to_step:08d}")


# -- 1. divergence -------------------------------------------------------------------------------------------------
ZERO3_PADDING_SCRIPT = """
import json
import sys
from pathlib import Path

import deepspeed, torch
from torch import nn
from adamae_scale.engine import setup
from adamae_scale.engine.guard import owned_values, weights_finite

env = setup.dist_env()
setup.init_distributed()
config = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
}
torch.manual_seed(0)
model = nn.Linear(3, 1)
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
weight = engine.module.weight  # 3 values in partitions of 2: rank 1 holds one value and one padding slot
held = owned_values(weight).numel()
if env.rank == 1:
    weight.ds_tensor[1] = float("nan")  # the padding, which DeepSpeed never writes
padding_ignored = weights_finite(engine.module)
if env.rank == 1:
    weight.ds_tensor[0] = float("nan")  # a real value
real_value_caught = not weights_finite(engine.module)
report = {"rank": env.rank, "partition": weight.ds_tensor.numel(), "held": held}
report.update(padding_ignored=padding_ignored, real_value_caught=real_value_caught)
(Path(sys.argv[1]) / f"rank{env.rank}.json").write_text(json.dumps(report))  # one file a rank: no interleaving
setup.shutdown()
"""


def test_zero3_weight_check_reads_each_partitions_values_not_its_padding(tmp_path):
    """The divergence check on ZeRO-3 partitions: the last partition's padding is uninitialised memory (a NaN bit
    pattern there once stopped a healthy 2-rank run with "the weights are not finite"), so only held values count."""
    script = tmp_path / "zero3_padding.py"
    script.write_text(ZERO3_PADDING_SCRIPT)
    run_torchrun(2, str(tmp_path), target=(str(script),), timeout=300)  # raises with the ranks' output on failure
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["partition"], r["held"]) for r in reports] == [(0, 2, 2), (1, 2, 1)]
    assert all(r["padding_ignored"] and r["real_value_caught"] for r in reports)


def test_guarded_adamw_skips_a_non_finite_step_and_leaves_its_state_alone():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    after_one, state = weight.detach().clone(), {k: v.clone() for k, v in opt.state[weight].items()}
    weight.grad = torch.tensor([1.0, float("nan"), 3.0])
    opt.step()
    assert opt.skipped == 1 and opt.calls == 2
    assert torch.equal(weight.detach(), after_one)
    assert all(torch.equal(opt.state[weight][k], v) for k, v in state.items())
    weight.grad = torch.tensor([1e30, 1.0, 1.0])  # huge but finite: a real step
    opt.refuse = True  # ... unless the trainer says the loss was not finite: every call is refused then
    opt.step()
    opt.step()
    assert opt.skipped == 3 and torch.equal(weight.detach(), after_one)
    opt.refuse = False
    opt.step()
    assert opt.skipped == 3 and not torch.equal(weight.detach(), after_one)


def test_the_built_adamw_is_fused_guarded_and_matches_the_for_loop_update():
    from adamae_scale.engine import optim, setup

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))

    fused_model, loop_model = model(), model()
    fused = optim.build_adamw(fused_model, 1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] and isinstance(fused, GuardedAdamW)
    assert not optim.fused_supported([{"params": [torch.zeros(2, dtype=torch.long)]}])
    offloaded = optim.build_adamw(model(), 1e-2, cpu_offload=True)  # torch's, on a CPU-only machine: no compile
    assert isinstance(offloaded, GuardedAdamW) == (setup.accelerator() == "cpu")
    twin = dict(zip(fused_model.parameters(), loop_model.parameters(), strict=True))
    loop = torch.optim.AdamW(
        [
            {**{k: v for k, v in g.items() if k not in ("fused", "foreach")}, "params": [twin[p] for p in g["params"]]}
            for g in fused.param_groups
        ],
        foreach=False,
        fused=False,
    )
    assert not any(g["fused"] or g["foreach"] for g in loop.param_groups)
    x = torch.randn(8, 16)
    for step in range(6):
        for m, opt in ((fused_model, fused), (loop_model, loop)):
            m(x).pow(2).mean().backward()
            if step == 3:  # a NaN gradient: the guard skips the step; the plain AdamW is not stepped either
                next(m.parameters()).grad[0, 0] = float("nan")
            if step != 3 or opt is fused:
                opt.step()
            opt.zero_grad()
    assert fused.skipped == 1
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_diverged_weights_never_become_latest_and_a_sane_rerun_recovers(tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = [*FP32, "ds=zero1", "train.steps=6", "train.ckpt_every=1", f"run_dir={run_dir}"]
    run_pretrain(*common)
    reference = losses(run_dir)
    rewind(ckpts, 2)

    # Step 3 blows the weights up (finite, ~1e27); steps 4-6 have non-finite losses and are skipped.
    proc = run_pretrain(*common, "train.base_lr=1e30", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "step 6:" in line and "3 optimizer steps in a row (steps 4-6" in line and "step_00000002" in line
    assert "step 4: non-finite loss or gradients; optimizer step skipped (1 in a row" in proc.stderr
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert (ckpts / "step_00000003.diverged").is_dir() and not (ckpts / "step_00000003").exists()
    assert not (ckpts / "step_00000004").exists()  # no checkpoint from the weights that gave NaN
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows[-3:]] == [1, 2, 3] and rows[-1]["loss"] is None

    run_pretrain(*common)  # a sane lr: resumes from the last good checkpoint
    assert steps_logged(run_dir) == list(range(1, 7))
    assert losses(run_dir) == reference  # bit-exact: the skipped steps left nothing behind


def test_a_run_whose_last_steps_were_skipped_still_saves_its_final_checkpoint(tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = [*FP32, "ds=zero0", "train.steps=5", "train.ckpt_every=2", "train.max_skipped_in_a_row=100"]
    proc = run_pretrain(*common, "train.base_lr=1e30", f"run_dir={run_dir}")
    assert "step 2: checkpoint postponed (this step was skipped)" in proc.stderr  # a periodic save waits
    assert "the run ends after 4 skipped step(s): saving the weights of step 1" in proc.stderr
    assert (ckpts / "latest").read_text() == "step_00000005" and verify(ckpts / "step_00000005") is None
    run_pretrain(*common, "train.steps=6", f"run_dir={run_dir}")  # resumes from it
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 5


def test_a_loss_spike_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_pretrain(
        *FP32,
        "ds=zero0",
        "train.steps=30",
        "train.ckpt_every=0",
        "train.base_lr=1e6",
        "train.loss_spike_factor=3",
        f"run_dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "train.loss_spike_factor=3.0" in line or "were not finite" in line, line
    assert steps_logged(run_dir)[-1] < 30


# -- 2. damaged checkpoints ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 4-step ZeRO-1 run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run_pretrain(*FP32, "ds=zero1", "train.steps=4", "train.ckpt_every=2", f"run_dir={run_dir}")
    return run_dir


def test_every_checkpoint_has_a_manifest_that_verifies(saved_run):
    tag = saved_run / "checkpoints" / "step_00000004"
    manifest = json.loads((tag / MANIFEST).read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == {p.name for p in tag.iterdir() if p.name != MANIFEST}
    assert verify(tag) is None


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    newest = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    proc = run_pretrain(*FP32, "ds=zero1", "train.steps=5", "train.ckpt_every=2", f"run_dir={run_dir}")
    assert "resume: skipping step_00000004: mp_rank_00_model_states.pt has 1000 bytes" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 2
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5]

    # Same-size corruption of every checkpoint: nothing verifies, one line, and nothing is trained over.
    for tag in (run_dir / "checkpoints").glob("step_*"):
        states = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        data = bytearray(states.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        states.write_bytes(bytes(data))
    proc = run_pretrain(*FP32, "ds=zero1", "train.steps=6", f"run_dir={run_dir}", check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "no checkpoint in" in line and "verifies" in line
    assert "does not match its checksum (damaged)" in proc.stderr


def test_resuming_with_another_zero_stage_is_refused_in_one_line(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)  # written with ds=zero1 (ZeRO-2 shares its layout and loads it)
    for ds in ("zero0", "zero3"):
        proc = run_pretrain(*FP32, f"ds={ds}", "train.steps=6", f"run_dir={run_dir}", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        assert f"ds={ds}: the checkpoint to resume was written with ds=zero1 (ZeRO stage 1)" in line
        assert "pass ds=zero1 (or ds=auto" in line and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def test_a_renamed_checkpoint_folder_resumes_at_the_step_it_records(saved_run, tmp_path):
    run_dir, best = tmp_path / "run", tmp_path / "best"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", best)  # e.g. kept aside as the best one
    proc = run_pretrain(*FP32, "ds=zero1", "train.steps=5", f"train.resume={best}", f"run_dir={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 4
    assert steps_logged(run_dir) == [5] and "global batch" not in proc.stderr

    # Another global batch (here a smaller micro-batch; on another world size alike) resumes, and says so.
    smaller = [*FP32, "ds=zero1", "train.steps=5", "train.micro_batch_size=2", f"train.resume={best}"]
    proc = run_pretrain(*smaller, f"run_dir={tmp_path / 'smaller'}")
    assert (
        f"[adamae] warning: train.resume={best} was trained at a global batch of 4; this run's is 2 "
        "(train.micro_batch_size=2 x train.accumulation=1 x 1 ranks), so the lr schedule now peaks at "
    ) in proc.stderr and "to keep 4, choose micro_batch_size x accumulation = 4\n" in proc.stderr


def test_resuming_with_other_model_settings_says_which_in_one_warning(saved_run, tmp_path):
    """Settings that keep every weight's shape load silently and change the method from the resumed step on: said
    in one line. A setting the checkpoint predates counts at its default (what the code that wrote it ran)."""
    run_dir, tag = tmp_path / "run", tmp_path / "step4"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    config = json.loads((tag / "config.json").read_text())
    del config["model"]["sampler_kv_pool"]  # as written before the option existed
    (tag / "config.json").write_text(json.dumps(config))
    manifest = json.loads((tag / MANIFEST).read_text())
    written = (tag / "config.json").read_bytes()
    manifest["files"]["config.json"] = {"bytes": len(written), "sha256": hashlib.sha256(written).hexdigest()}
    (tag / MANIFEST).write_text(json.dumps(manifest))
    same = [*FP32, "ds=zero1", "train.steps=5", f"train.resume={tag}"]
    proc = run_pretrain(*same, f"run_dir={run_dir}")
    assert "other model settings" not in proc.stderr and steps_logged(run_dir) == [5]
    changed = [*same, "model.sampler_kv_pool=2", "model.sampler_precision=bf16"]
    proc = run_pretrain(*changed, f"run_dir={tmp_path / 'changed'}")
    assert (
        f"[adamae] warning: train.resume={tag} was trained with other model settings: sampler_precision 'fp32' -> "
        "'bf16', sampler_kv_pool 1 -> 2; training continues with the new ones\n"
    ) in proc.stderr
    assert steps_logged(tmp_path / "changed") == [5]


def converted_step(universal: Path) -> int:
    """The optimizer step a universal checkpoint was converted at (AdamW's step count of one parameter)."""
    return int(torch.load(universal / "zero" / "decoder.head.bias" / "step.pt", weights_only=True))


def test_a_failed_universal_conversion_stops_every_rank_with_rank0s_reason(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    tag = run_dir / "checkpoints" / "step_00000004"
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # DeepSpeed's converter cannot work without it
    run_torchrun(2, str(tag), str(tmp_path), target=("-m", "tests.dist_universal"), timeout=240)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[0] == said[1], said  # rank 1 did not wait for rank 0 in a barrier: it stopped with its reason
    assert said[0].startswith(f"NoUsableCheckpoint: train.resume: converting {tag} to a universal checkpoint")
    assert "\n" not in said[0] and not list(tag.parent.glob("*universal*")), said[0]


def test_a_rewritten_checkpoint_is_never_resumed_through_its_old_universal_form(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    ckpts = run_dir / "checkpoints"
    four = CheckpointRef(ckpts, "step_00000004", {"world_size": 2})  # as a 2-rank resume sees it
    universal = to_universal(four, is_rank0=True)
    assert converted_step(universal.path) == 4 and (ckpts / "latest_universal").read_text() == universal.tag

    # step_4 replaced behind the checkpointer's back (here by step_2's files): its universal form is redone.
    shutil.rmtree(ckpts / "step_00000004")
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000004")
    assert converted_step(to_universal(four, is_rank0=True).path) == 2

    # A run that saves step 4 again (resumed from step 2) drops the universal form of the old step 4.
    common = [*FP32, "ds=zero1", "train.steps=4", "train.ckpt_every=2", f"run_dir={run_dir}"]
    run_pretrain(*common, f"train.resume={ckpts / 'step_00000002'}")
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 2
    assert not (ckpts / "step_00000004_universal").exists() and not (ckpts / "latest_universal").exists()
    assert verify(ckpts / "step_00000004") is None


def test_consolidate_verifies_the_manifest_and_refuses_nonfinite_weights(saved_run, tmp_path, capsys):
    tag = tmp_path / "step_00000004"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    states = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(states.read_bytes())
    data[-5000:-4000] = bytes(1000)
    states.write_bytes(bytes(data))
    code, _, err = convert_cli(capsys, "consolidate", tag, tmp_path / "out")
    assert code == 2 and "is damaged" in one_line_error(err) and "checksum" in err

    # NaN in the fp32 master partition of a checkpoint that verifies (its manifest rewritten).
    shutil.rmtree(tag)
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    state = torch.load(states, weights_only=False)  # our own file, made by this test's run
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][7] = float("nan")
    torch.save(state, states)
    reseal(tag, states)
    code, _, err = convert_cli(capsys, "consolidate", tag, tmp_path / "out")
    assert code == 2 and "NaN/inf" in one_line_error(err) and "--allow-nonfinite" in err
    assert not (tmp_path / "out").exists()
    code, _, err = convert_cli(capsys, "consolidate", tag, tmp_path / "out", "--allow-nonfinite")
    assert code == 0, err


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(tag: Path, changed: Path) -> None:
    """Rewrite ``changed``'s manifest entry, so the edited checkpoint verifies."""
    manifest = json.loads((tag / MANIFEST).read_text())
    manifest["files"][changed.name] = {"bytes": changed.stat().st_size, "sha256": _sha256(changed)}
    (tag / MANIFEST).write_text(json.dumps(manifest))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(saved_run, tmp_path):
    """DeepSpeed un-pickles its checkpoint files in full: a planted object must be refused before that, in one line."""
    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(saved_run, run_dir)
    tag = run_dir / "checkpoints" / "step_00000004"
    states = tag / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)  # our own file, made by this test's run
    state["payload"] = RunsCodeWhenUnpickled(marker)
    torch.save(state, states)
    reseal(tag, states)
    assert verify(tag) is None

    proc = run_pretrain(*FP32, "ds=zero1", "train.steps=6", f"run_dir={run_dir}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"refusing to load {states}" in line and "posix.system" in line
    assert not marker.exists()

    # Resuming on another world size converts with DeepSpeed's ds_to_universal, which un-pickles too.
    with pytest.raises(NoUsableCheckpoint, match="posix.system"):
        to_universal(CheckpointRef(tag.parent, tag.name, {"world_size": 2}), is_rank0=True)
    assert not marker.exists() and not (tag.parent / "step_00000004_universal").exists()


def test_import_of_a_text_file_is_one_line(tmp_path, capsys):
    text = tmp_path / "checkpoint-799.pth"
    text.write_text("this is not a checkpoint\n" * 20)
    code, _, err = convert_cli(capsys, "import", text, tmp_path / "out")
    assert code == 2 and "not a PyTorch checkpoint" in one_line_error(err)


# -- 3. metrics after a resume -----------------------------------------------------------------------------------
def test_resumed_metrics_have_every_step_once_in_order(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tb").mkdir(parents=True)
    rows = [{"step": s, "loss": float(s)} for s in range(1, 8)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    logger = MetricsLogger(run_dir, resume_step=5)
    logger.log(6, {"loss": 60.0})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
        (6, 60.0),
    ]
    MetricsLogger(run_dir, resume_step=0).close()  # a fresh start keeps the old file aside
    assert not (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.previous.jsonl").is_file()


# -- 4. a full disk ----------------------------------------------------------------------------------------------
def run_full_disk(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, str(FULL_DISK_SCRIPT), *overrides], env=cli_env(**env))


def test_a_full_disk_is_said_in_words_and_leaves_no_partial_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FP32, "ds=zero1", "train.steps=6", "train.ckpt_every=2", f"run_dir={run_dir}"]
    proc = run_full_disk(*args, ADAMAE_FULL_DISK_FROM_STEP="4")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "checkpoint step_00000004 could not be written" in line and "the disk is full" in line
    assert "newest complete checkpoint is step_00000002" in line and "Traceback" not in proc.stderr
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step_00000004").exists() and (ckpts / "latest").read_text() == "step_00000002"

    # The re-run on a disk with too little space stops before building anything.
    started = time.perf_counter()
    proc = run_full_disk(*args, ADAMAE_FREE_BYTES=str(10**6))
    assert proc.returncode == 2
    assert "not enough free disk space for the first checkpoint" in error_line(proc)
    assert "[adamae] vit_tiny" not in proc.stdout and time.perf_counter() - started < 60

    run_pretrain(*args)  # space again: resumes from step 2
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]


def test_a_manifest_that_cannot_be_written_leaves_the_previous_checkpoint_newest(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FP32, "ds=zero1", "train.steps=4", "train.ckpt_every=2", f"run_dir={run_dir}"]
    proc = run_full_disk(*args, ADAMAE_FULL_DISK_FROM_STEP="4", ADAMAE_FULL_DISK_AT="manifest")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = error_line(proc)
    assert "checkpoint step_00000004 could not be written" in line and "the disk is full" in line
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step_00000004").exists() and (ckpts / "latest").read_text() == "step_00000002"


# -- 5. checks before anything starts ----------------------------------------------------------------------------
def config(*overrides: str, run_dir: Path | None = None) -> dict:
    cfg = compose([*TINY_RUN, *overrides])
    if run_dir is not None:
        cfg["run_dir"] = str(run_dir)
    return cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("masking.ratio=1.5", "masking.ratio=1.5: expected a number strictly between 0 and 1"),
        ("masking.ratio=0", "masking.ratio=0: expected a number strictly between 0 and 1"),
        ("masking.ratio=0.99", "leaves no visible token of 32"),
        ("model.patch_size=0", "model.patch_size=0: expected an integer >= 1"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0"),
        ("train.loss_spike_factor=0.5", "train.loss_spike_factor=0.5"),
        ("train.max_skipped_in_a_row=0", "train.max_skipped_in_a_row=0"),
        ("train.resume=/nonexistent/step_00000001", "train.resume=/nonexistent/step_00000001: no such folder"),
    ],
)
def test_bad_values_are_refused_by_the_schema(override, expected):
    with pytest.raises(ValueError, match="^.*$") as err:
        schema.validate(config(override))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_files_and_folders_are_refused_by_the_schema(tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    stage7 = tmp_path / "stage7.json"
    stage7.write_text('{"zero_optimization": {"stage": 7}}')
    empty = tmp_path / "empty"
    empty.mkdir()
    regular = tmp_path / "a-file"
    regular.write_text("x")
    cases = [
        (config(f"ds={listing}"), "expected a JSON object, got a JSON list"),
        (config(f"ds={stage7}"), "zero_optimization.stage=7, expected 0, 1, 2 or 3"),
        (config(f"train.resume={empty}"), "not a checkpoint folder"),
        (config(run_dir=regular / "run"), f"{regular} is a file, not a folder"),
    ]
    for cfg, expected in cases:
        with pytest.raises(ValueError) as err:
            schema.validate(cfg)
        assert expected in str(err.value)


def test_a_bad_value_fails_in_seconds_with_one_line_and_exit_2(tmp_path):
    started = time.perf_counter()
    proc = run_pretrain(*TINY_RUN, "model=vit_large", "masking.ratio=1.5", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "masking.ratio=1.5" in error_line(proc)
    assert time.perf_counter() - started < 60 and not (tmp_path / "r").exists()  # not even Hydra's log

    regular = tmp_path / "a-file"
    regular.write_text("x")
    proc = run_pretrain(*TINY_RUN, f"run_dir={regular / 'run'}", check=False)
    assert proc.returncode == 2 and f"{regular} is a file, not a folder" in error_line(proc)
    with pytest.raises(ValueError, match="no_such_key"):  # Hydra's own errors: one line too
        schema.compose([*TINY_RUN, "train.no_such_key=1"])


# -- kill -9 at random moments ------------------------------------------------------------------------------------
def kill_and_resume(tmp_path: Path, kills: int, steps: int, seed: int, stop_after: int | None = None) -> None:
    """Kill a ``ckpt_every=1`` run with SIGKILL at ``kills`` random moments, re-running it each time; the final
    loss curve equals an uninterrupted run's bit for bit and every step is in metrics.jsonl once. With
    ``stop_after``, the first invocation ends cleanly there first (``train.stop_after``, as a scheduler's
    time limit would)."""
    common = [*FP32, "ds=zero0", f"train.steps={steps}", "train.ckpt_every=1"]
    straight = tmp_path / "straight"
    run_pretrain(*common, f"run_dir={straight}")
    run_dir = tmp_path / "killed"
    if stop_after is not None:
        run_pretrain(*common, f"train.stop_after={stop_after}", f"run_dir={run_dir}")
        assert losses(run_dir) == losses(straight)[:stop_after]
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "adamae_scale.pretrain", *common, f"run_dir={run_dir}"]
    killed = 0
    while killed < kills:
        proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = _logged_steps(run_dir)
        # Wait for one more step, then kill at a random moment of the following ones (saves included).
        deadline = time.time() + 240
        while _logged_steps(run_dir) <= start and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed += 1
    assert killed == kills, f"the run ended after {killed} kills: give it more steps"
    run_pretrain(*common, f"run_dir={run_dir}")
    assert steps_logged(run_dir) == list(range(1, steps + 1))
    assert losses(run_dir) == losses(straight)


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps, default=0)


def test_stop_then_kill_9_then_resume_is_exact(tmp_path):
    kill_and_resume(tmp_path, kills=1, steps=8, seed=0, stop_after=2)


@pytest.mark.slow
def test_kill_9_at_ten_random_moments_then_resume_is_exact(tmp_path):
    kill_and_resume(tmp_path, kills=10, steps=150, seed=1)


def test_checkpointer_refuses_a_tag_folder_that_does_not_verify(saved_run, tmp_path):
    tag = tmp_path / "step_00000002"
    shutil.copytree(saved_run / "checkpoints" / "step_00000002", tag)
    (tag / MANIFEST).unlink()
    with pytest.raises(ValueError, match="no readable manifest.json"):
        Checkpointer(tmp_path, 1).find(str(tag))
    assert os.path.isdir(tag)


def test_an_engine_without_the_trainers_interface_is_named_before_training():
    class HalfEngine:  # an engine that forgot checkpoint loading and the accumulation boundary
        module = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        device, global_rank, world_size = torch.device("cpu"), 0, 1

        def __call__(self, *args, **kwargs): ...
        def train(self, mode=True): ...
        def eval(self): ...
        def backward(self, loss): ...
        def step(self): ...
        def gradient_accumulation_steps(self):
            return 1

        def train_micro_batch_size_per_gpu(self):
            return 1

        def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True): ...

    plan = TrainPlan(steps=1, global_batch=1)
    with pytest.raises(
        TypeError,
        match=r"^HalfEngine is not a TrainingEngine: it has no "
        r"is_gradient_accumulation_boundary, load_checkpoint$",
    ):
        Trainer(HalfEngine(), lambda engine, batch: {}, iter([]), None, None, None, plan)
