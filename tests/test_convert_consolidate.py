"""``adamae-convert consolidate`` (and the commands after it) on real ``adamae-pretrain`` checkpoints: ZeRO-0/1 on
one process, ZeRO-2/3 on two ranks under torchrun. The reference is the run's own fp32 master weights, gathered
from the live engine by ``pretrain_with_master_dump.py`` right after the final checkpoint."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adamae_scale.base import weights as convert_io
from adamae_scale.convert.folder import load_model
from adamae_scale.models.adamae import Encoder

from .conftest import REPO, TINY_RUN, cli_env, convert_cli, one_line_error, run_command, run_dumping_state, torchrun_cmd

WORLD_SIZE = {"zero0": 1, "zero1": 1, "zero2": 2, "zero3": 2}


def train(run_dir: Path, ds: str) -> dict:
    """Two optimizer steps of the tiny model (bf16 autocast, fp32 weights); returns paths of the results."""
    overrides = [o for o in TINY_RUN if not o.startswith("eval.")]
    overrides += ["precision=bf16", f"ds={ds}", "train.steps=2", "eval.focus_batches=0", f"run_dir={run_dir}"]
    master = run_dir / "master_fp32.safetensors"
    run_dumping_state(WORLD_SIZE[ds], master, *overrides)
    return {"ckpts": run_dir / "checkpoints", "tag": run_dir / "checkpoints" / "step_00000002", "master": master}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(ds)``: one training run per ZeRO stage, made on first use and shared by the module's tests."""
    made: dict[str, dict] = {}

    def get(ds: str) -> dict:
        if ds not in made:
            made[ds] = train(tmp_path_factory.mktemp(ds), ds)
        return made[ds]

    return get


def convert(*args: str) -> subprocess.CompletedProcess:
    """``adamae-convert ARGS`` as a user types it."""
    return run_command([sys.executable, "-m", "adamae_scale.convert.cli", *map(str, args)])


# ZeRO-1 and ZeRO-2 checkpoints share one layout (zero_to_fp32's stage-1/2 path): zero1 runs with the slow tests.
@pytest.mark.parametrize("ds", ["zero0", pytest.param("zero1", marks=pytest.mark.slow), "zero2", "zero3"])
def test_consolidate_is_bit_identical_to_the_runs_fp32_master_weights(runs, ds, tmp_path):
    run = runs(ds)
    out = tmp_path / "consolidated"
    proc = convert("consolidate", run["ckpts"], out)
    assert proc.returncode == 0, proc.stderr
    assert f"ZeRO-{ds[-1]} checkpoint step_00000002 (world size {WORLD_SIZE[ds]}" in proc.stdout

    master = load_file(run["master"])
    written = load_file(out / "model.safetensors")
    model = load_model(out)  # strict load into the architecture config.json describes
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert list(f.offset_keys()) == list(model.state_dict())  # every parameter, in the model's order, nothing else
    assert set(written) == set(master)
    for name, tensor in master.items():
        assert written[name].dtype == torch.float32, name
        assert torch.equal(written[name], tensor), f"{name} differs from the fp32 master"

    config = json.loads((out / "config.json").read_text())
    run_config = json.loads((run["tag"] / "config.json").read_text())
    assert config["format"] == "adamae-full" and config["dtype"] == "float32"
    assert config["model"] == run_config["model"] and config["ds"] == ds
    assert config["source"]["zero_stage"] == int(ds[-1]) and config["source"]["world_size"] == WORLD_SIZE[ds]
    assert config["source"]["global_steps"] == 2


def test_consolidate_bf16_is_the_master_rounded_and_a_tag_folder_works(runs, tmp_path):
    run = runs("zero3")
    out = tmp_path / "bf16"
    proc = convert("consolidate", run["tag"], out, "--dtype", "bf16")  # the tag folder itself this time
    assert proc.returncode == 0, proc.stderr
    master = load_file(run["master"])
    written = load_file(out / "model.safetensors")
    assert all(
        written[k].dtype == torch.bfloat16 and torch.equal(written[k], v.to(torch.bfloat16)) for k, v in master.items()
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_encoder_export_and_hf_export_of_a_pretrain_checkpoint(runs, tmp_path):
    import transformers  # the test extra installs it: this test runs in CI, never skipped

    run = runs("zero2")
    full, encoder_dir, hf_dir = tmp_path / "full", tmp_path / "encoder", tmp_path / "hf"
    assert convert("consolidate", run["ckpts"], full).returncode == 0
    proc = convert("export-encoder", full, encoder_dir)
    assert proc.returncode == 0, proc.stderr
    proc = convert("to-hf", full, hf_dir)
    assert proc.returncode == 0, proc.stderr

    model = load_model(full)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, cfg.num_frames, *cfg.img_size, generator=generator)
    visible = torch.stack([torch.randperm(cfg.num_tokens, generator=generator)[: cfg.num_visible] for _ in range(2)])
    mask = torch.ones(2, cfg.num_tokens, dtype=torch.bool).scatter(1, visible, False)

    # Encoder only: exactly the encoder's parameters, and the same features as inside the full model.
    encoder_config = json.loads((encoder_dir / "config.json").read_text())
    assert encoder_config["format"] == "adamae-encoder" and encoder_config["key_layout"] == "adamae"
    encoder = Encoder(cfg).eval()
    encoder.load_state_dict(load_file(encoder_dir / "model.safetensors"), strict=True)
    visible_idx = torch.sort(visible, dim=1).values
    with torch.no_grad():
        tokens = model.encoder.patch_embed(video)
        assert torch.equal(encoder(encoder.patch_embed(video), visible_idx), model.encoder(tokens, visible_idx))

    # Hugging Face: loads with no missing or unexpected key and predicts the same pixels for the same mask.
    hf_model, info = transformers.VideoMAEForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    with torch.no_grad():
        ours = model(video, mask=mask).pred
        theirs = hf_model(pixel_values=video.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4


def test_consolidate_refuses_another_architecture_and_wrong_paths(runs, tmp_path, capsys):
    run = runs("zero2")
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], tmp_path / "a", "--model", "vit_small")
    assert code == 2
    line = one_line_error(err)
    assert "checkpoint does not match --model vit_small: checkpoint embed_dim 192 (--model vit_small has 384)" in line
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], tmp_path / "b", "--num-frames", "8")
    assert code == 2 and "sampler.pos_embed_probs is [1, 32, 192] there but [1, 64, 192]" in one_line_error(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    code, _, err = convert_cli(capsys, "consolidate", tmp_path / "nowhere", tmp_path / "c")
    assert code == 2 and "CKPT_DIR" in one_line_error(err) and "no such folder" in err
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], tmp_path / "c", "--tag", "step_00000099")
    assert code == 2 and "no checkpoint tag 'step_00000099' (found: ['step_00000002'])" in one_line_error(err)
    code, _, err = convert_cli(capsys, "consolidate", tmp_path, tmp_path / "c")
    assert code == 2 and "is not a DeepSpeed checkpoint" in one_line_error(err)

    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], existing)
    assert code == 2 and "already exists (pass --overwrite" in one_line_error(err)
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], run["tag"], "--overwrite")
    assert code == 2 and "would replace the input" in one_line_error(err)

    # A copy missing one rank's optimizer file: the manifest names it; without a manifest (a checkpoint from an
    # older version), DeepSpeed's own check does, in one line too.
    partial = tmp_path / "partial" / "step_00000002"
    shutil.copytree(run["tag"], partial)
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    code, _, err = convert_cli(capsys, "consolidate", partial, tmp_path / "d")
    assert code == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in one_line_error(err)
    (partial / "manifest.json").unlink()
    code, _, err = convert_cli(capsys, "consolidate", partial, tmp_path / "d")
    assert code == 2 and "Expected 2 of '*_optim_states.pt'" in one_line_error(err)

    # Without the run's config.json the architecture is read from the shapes; the clip geometry must be given.
    bare = tmp_path / "bare" / "step_00000002"
    shutil.copytree(run["tag"], bare)
    (bare / "config.json").unlink()
    (bare / "manifest.json").unlink()  # a hand-assembled checkpoint: no manifest either
    code, _, err = convert_cli(capsys, "consolidate", bare, tmp_path / "e")
    assert code == 2 and "covers 32 tokens" in one_line_error(err) and "--num-frames/--img-size" in err
    code, _, err = convert_cli(capsys, "consolidate", bare, tmp_path / "e", "--model", "vit_tiny")
    assert code == 2 and "depth 2 (--model vit_tiny has 12)" in one_line_error(err)
    code, _, err = convert_cli(
        capsys, "consolidate", bare, tmp_path / "e", "--num-frames", "4", "--img-size", "32", "--mask-ratio", "0.75"
    )
    assert code == 0, err
    assert (
        json.loads((tmp_path / "e" / "config.json").read_text())["model"]
        == json.loads((run["tag"] / "config.json").read_text())["model"]
    )
    master = load_file(run["master"])
    assert all(torch.equal(t, master[k]) for k, t in load_file(tmp_path / "e" / "model.safetensors").items())


def test_consolidate_refuses_a_malicious_pickle_in_a_checkpoint(runs, tmp_path, capsys):
    run = runs("zero2")
    tampered = tmp_path / "tampered" / "step_00000002"
    shutil.copytree(run["tag"], tampered)
    marker = tmp_path / "pwned"
    target = tampered / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsShell(f"touch {marker}")}, target)
    code, _, err = convert_cli(capsys, "consolidate", tampered, tmp_path / "out")
    assert code == 2 and f"{target.name} has {target.stat().st_size} bytes" in one_line_error(err)
    # An attacker can drop (or rewrite) the manifest: the loader refuses the pickle by itself.
    (tampered / "manifest.json").unlink()
    code, _, err = convert_cli(capsys, "consolidate", tampered, tmp_path / "out")
    assert code == 2
    line = one_line_error(err)
    assert "refusing to load" in line and "posix.system" in line and target.name in line
    assert not marker.exists() and not (tmp_path / "out").exists()


class _RunsShell:
    """Un-pickling this runs a shell command (the classic ``__reduce__`` attack)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_outputs_are_written_atomically(runs, tmp_path, capsys, monkeypatch):
    run = runs("zero2")
    out = tmp_path / "out"
    assert convert_cli(capsys, "consolidate", run["ckpts"], out)[0] == 0
    before = (out / "model.safetensors").read_bytes()

    real_write = convert_io.write_safetensors

    def write_then_fail(path, tensors, *args, **kwargs):
        real_write(path, tensors, *args, **kwargs)
        raise OSError(28, "No space left on device")  # the disk fills up after the weights are written

    monkeypatch.setattr("adamae_scale.convert.folder.write_safetensors", write_then_fail)
    code, _, err = convert_cli(capsys, "consolidate", run["ckpts"], out, "--overwrite", "--dtype", "bf16")
    assert code == 1 and "No space left on device" in one_line_error(err)
    assert convert_cli(capsys, "consolidate", run["ckpts"], tmp_path / "fresh")[0] == 1
    assert (out / "model.safetensors").read_bytes() == before  # the old output is untouched
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind

    monkeypatch.undo()
    assert convert_cli(capsys, "consolidate", run["ckpts"], out, "--overwrite", "--dtype", "bf16")[0] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("mask_token").dtype == torch.bfloat16


_PEAK_RSS_SCRIPT = """
import json, resource, sys
import deepspeed.utils.zero_to_fp32  # noqa: F401  (imported before the baseline: it is part of the tool)
from adamae_scale.convert import cli, consolidate
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = consolidate.consolidate(sys.argv[1], sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_vit_large_consolidation_needs_about_one_fp32_copy_of_memory(tmp_path, stage):
    """vit_large (330M parameters) trained one step on two ranks with a tiny clip (full-size weights, small
    activations), then consolidated in a fresh process that reports its peak RSS above its own import baseline.
    Needs ~8 GB of RAM and several minutes on 2 cores."""
    ds_config = tmp_path / f"zero{stage}.json"
    buckets = {"reduce_bucket_size": 50_000_000, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        buckets.update(stage3_prefetch_bucket_size=50_000_000, stage3_param_persistence_threshold=100_000)
    else:
        buckets.update(allgather_bucket_size=50_000_000, reduce_scatter=True)
    ds_config.write_text(
        json.dumps({"zero_optimization": {"stage": stage, **buckets}, "zero_allow_untested_optimizer": True})
    )
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(
        2,
        "model=vit_large",
        "model.num_frames=2",
        "model.img_size=[32,32]",
        "model.patch_size=16",
        "masking.ratio=0.75",
        "data=synthetic",
        "train.micro_batch_size=1",
        "train.steps=1",
        "eval.focus_batches=0",
        f"ds={ds_config}",
        f"run_dir={run_dir}",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]

    out = tmp_path / "consolidated"
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(run_dir / "checkpoints"), str(out)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    memory = json.loads(proc.stdout.strip().splitlines()[-1])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        fp32_bytes = 4 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    increase = (memory["peak_kib"] - memory["baseline_kib"]) * 1024
    print(
        f"ZeRO-{stage} vit_large: fp32 copy {fp32_bytes / 1e9:.2f} GB, consolidate peak RSS "
        f"{memory['peak_kib'] * 1024 / 1e9:.2f} GB = imports {memory['baseline_kib'] * 1024 / 1e9:.2f} GB "
        f"+ {increase / 1e9:.2f} GB"
    )
    assert fp32_bytes > 1.2e9
    assert increase < 1.2 * fp32_bytes
