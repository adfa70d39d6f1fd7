"""``adamae-convert import``: reference AdaMAE and VideoMAE checkpoints → this project's weights.

The checkpoints are built here with the reference key names, and the reference network is written here with
plain torch ops straight from those names (no code from ``adamae_scale``), so the imported model must agree
with an independent reading of the reference layout on the same input and mask."""

import argparse
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adamae_scale.convert.folder import load_model

from .conftest import REPO, cli_env, convert_cli, one_line_error

# A tiny reference geometry: 4 frames of 32x32 in 2x8x8 tubelets = 2*4*4 = 32 tokens.
DIM, DEPTH, HEADS = 192, 2, 3  # the encoder widths of vit_tiny, so the head count is known from the width
DEC_DIM, DEC_DEPTH, DEC_HEADS = 128, 1, 4
FRAMES, SIZE, TUBELET, PATCH = 4, 32, 2, 8
NUM_TOKENS = (FRAMES // TUBELET) * (SIZE // PATCH) ** 2
SAMPLER_HEADS = 8


def reference_state_dict(adaptive: bool, seed: int = 0, dim: int = DIM) -> dict[str, torch.Tensor]:
    """Random weights under the reference release's names (``encoder.get_token_probs`` for the sampler)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    sd = {
        "encoder.patch_embed.proj.weight": rand(dim, 3, TUBELET, PATCH, PATCH, scale=0.02),
        "encoder.patch_embed.proj.bias": rand(dim),
    }

    def block(prefix, width, qkv_bias=True):
        sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"] = 1 + rand(width, scale=0.1), rand(width)
        sd[f"{prefix}.attn.qkv.weight"] = rand(3 * width, width, scale=width**-0.5)
        if qkv_bias:
            sd[f"{prefix}.attn.q_bias"], sd[f"{prefix}.attn.v_bias"] = rand(width), rand(width)
        sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"] = (
            rand(width, width, scale=width**-0.5),
            rand(width),
        )
        sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"] = 1 + rand(width, scale=0.1), rand(width)
        sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"] = (
            rand(4 * width, width, scale=width**-0.5),
            rand(4 * width),
        )
        sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"] = (
            rand(width, 4 * width, scale=(4 * width) ** -0.5),
            rand(width),
        )

    for i in range(DEPTH):
        block(f"encoder.blocks.{i}", dim)
    sd["encoder.norm.weight"], sd["encoder.norm.bias"] = 1 + rand(dim, scale=0.1), rand(dim)
    if adaptive:
        sd["encoder.pos_embed_probs"] = rand(1, NUM_TOKENS, dim, scale=0.5)
        block("encoder.get_token_probs.0", dim, qkv_bias=False)
        sd["encoder.get_token_probs.1.weight"], sd["encoder.get_token_probs.1.bias"] = (
            rand(1, dim, scale=dim**-0.5),
            rand(1),
        )
    sd["encoder_to_decoder.weight"] = rand(DEC_DIM, dim, scale=dim**-0.5)
    sd["mask_token"] = rand(1, 1, DEC_DIM, scale=0.02)
    for i in range(DEC_DEPTH):
        block(f"decoder.blocks.{i}", DEC_DIM)
    sd["decoder.norm.weight"], sd["decoder.norm.bias"] = 1 + rand(DEC_DIM, scale=0.1), rand(DEC_DIM)
    sd["decoder.head.weight"] = rand(3 * TUBELET * PATCH * PATCH, DEC_DIM, scale=DEC_DIM**-0.5)
    sd["decoder.head.bias"] = rand(3 * TUBELET * PATCH * PATCH)
    return sd


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The reference's fixed table, computed the reference's way (numpy, position / 10000^(2*(j//2)/dim))."""
    angles = np.array([[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(num_positions)])
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32).unsqueeze(0)


def reference_block(sd, prefix, x, heads, eps, qkv_bias=True):
    batch, tokens, width = x.shape
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"], eps)
    bias = None
    if qkv_bias:
        v_bias = sd[f"{prefix}.attn.v_bias"]
        bias = torch.cat([sd[f"{prefix}.attn.q_bias"], torch.zeros_like(v_bias), v_bias])
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], bias).reshape(batch, tokens, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + F.linear(h, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"], eps)
    h = F.linear(
        F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"])),
        sd[f"{prefix}.mlp.fc2.weight"],
        sd[f"{prefix}.mlp.fc2.bias"],
    )
    return x + h


def reference_forward(sd, video, mask, dim=DIM, heads=HEADS):
    """(pred of the masked tokens, sampler logits or None), as the reference computes them."""
    batch = video.shape[0]
    x = (
        F.conv3d(
            video,
            sd["encoder.patch_embed.proj.weight"],
            sd["encoder.patch_embed.proj.bias"],
            stride=(TUBELET, PATCH, PATCH),
        )
        .flatten(2)
        .transpose(1, 2)
    )
    logits = None
    if "encoder.pos_embed_probs" in sd:
        s = reference_block(
            sd, "encoder.get_token_probs.0", x + sd["encoder.pos_embed_probs"], SAMPLER_HEADS, 1e-5, qkv_bias=False
        )
        logits = F.linear(s, sd["encoder.get_token_probs.1.weight"], sd["encoder.get_token_probs.1.bias"]).flatten(1)
    x = (x + sinusoid_table(NUM_TOKENS, dim))[~mask].reshape(batch, -1, dim)
    for i in range(DEPTH):
        x = reference_block(sd, f"encoder.blocks.{i}", x, heads, 1e-6)
    x = F.layer_norm(x, (dim,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], 1e-6)
    x = F.linear(x, sd["encoder_to_decoder.weight"])
    pos = sinusoid_table(NUM_TOKENS, DEC_DIM).expand(batch, -1, -1)
    x = torch.cat(
        [x + pos[~mask].reshape(batch, -1, DEC_DIM), sd["mask_token"] + pos[mask].reshape(batch, -1, DEC_DIM)], dim=1
    )
    for i in range(DEC_DEPTH):
        x = reference_block(sd, f"decoder.blocks.{i}", x, DEC_HEADS, 1e-6)
    num_masked = int(mask[0].sum())
    x = F.layer_norm(x[:, -num_masked:], (DEC_DIM,), sd["decoder.norm.weight"], sd["decoder.norm.bias"], 1e-6)
    return F.linear(x, sd["decoder.head.weight"], sd["decoder.head.bias"]), logits


def inputs(num_visible: int = 8, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 3, FRAMES, SIZE, SIZE, generator=generator)
    visible = torch.stack([torch.randperm(NUM_TOKENS, generator=generator)[:num_visible] for _ in range(batch)])
    return video, torch.ones(batch, NUM_TOKENS, dtype=torch.bool).scatter(1, visible, False)


def save_reference_checkpoint(path, sd, entry="model", args=None):
    torch.save(
        {
            entry: sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": []}]},
            "epoch": 799,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": args,
        },
        path,
    )


def reference_args(**overrides):
    values = dict(
        model="pretrain_adamae_tiny_patch8_32",
        num_frames=FRAMES,
        input_size=SIZE,
        mask_type="adaptive",
        mask_ratio=0.75,
        batch_size=8,
        lr=1.5e-4,
        device="cuda",
        output_dir="/checkpoints/adamae",
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_reference_adamae_checkpoint_imports_and_matches_the_reference_forward(tmp_path, capsys):
    sd = reference_state_dict(adaptive=True)
    src = tmp_path / "checkpoint-799.pth"
    save_reference_checkpoint(src, sd, args=reference_args())
    out = tmp_path / "imported"
    code, stdout, err = convert_cli(capsys, "import", src, out)
    assert code == 0, err
    assert "adamae-reference checkpoint" in stdout and "4x32x32 clips" in stdout

    model = load_model(out)
    cfg = model.cfg
    assert (
        cfg.embed_dim,
        cfg.depth,
        cfg.num_heads,
        cfg.decoder_embed_dim,
        cfg.decoder_depth,
        cfg.decoder_num_heads,
    ) == (DIM, DEPTH, HEADS, DEC_DIM, DEC_DEPTH, DEC_HEADS)
    assert (cfg.masking, cfg.mask_ratio, cfg.num_tokens, cfg.name) == ("adaptive", 0.75, NUM_TOKENS, "vit_tiny")

    video, mask = inputs()
    with torch.no_grad():
        ours = model(video, mask=mask)
        pred, logits = reference_forward(sd, video, mask)
    assert torch.equal(ours.mask, mask)
    torch.testing.assert_close(ours.pred, pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.logits, logits, rtol=1e-5, atol=1e-5)
    assert pred.abs().mean() > 0.1 and logits.std() > 0.01  # the comparison is not between near-zero tensors

    report = json.loads((out / "config.json").read_text())["import_report"]
    assert report["source_kind"] == "adamae-reference" and report["weights_entry"] == "model"
    assert report["renamed"]["encoder.get_token_probs.1.weight"] == "sampler.head.weight"
    assert report["renamed"]["encoder.pos_embed_probs"] == "sampler.pos_embed_probs"
    assert report["kept"] + len(report["renamed"]) == len(sd)  # every key is used
    assert set(report["other_entries"]) == {"optimizer", "epoch", "scaler", "args"}


def test_videomae_checkpoint_imports_with_tube_masking_or_a_fresh_sampler(tmp_path, capsys):
    sd = reference_state_dict(adaptive=False, seed=3)
    # Saved from a DistributedDataParallel module under 'module', with the fixed table VideoMAE keeps as a tensor.
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    wrapped["module.encoder.pos_embed"] = sinusoid_table(NUM_TOKENS, DIM)
    src = tmp_path / "videomae.pth"
    save_reference_checkpoint(src, wrapped, entry="module")
    geometry = ["--num-frames", FRAMES, "--img-size", SIZE]

    code, stdout, err = convert_cli(capsys, "import", src, tmp_path / "tube", *geometry)
    assert code == 0, err
    model = load_model(tmp_path / "tube")
    assert (model.cfg.masking, model.cfg.mask_ratio, model.sampler) == ("tube", 0.9, None)
    config = json.loads((tmp_path / "tube" / "config.json").read_text())
    assert config["source"]["kind"] == "videomae" and config["source"]["epoch"] == 799
    assert "fixed 1-D sin-cos" in config["import_report"]["dropped"]["encoder.pos_embed"]

    video, mask = inputs(num_visible=4)
    with torch.no_grad():
        ours = model(video, mask=mask)
        pred, logits = reference_forward(sd, video, mask)
    assert ours.logits is None and logits is None
    torch.testing.assert_close(ours.pred, pred, rtol=0, atol=1e-5)

    code, stdout, err = convert_cli(
        capsys, "import", src, tmp_path / "adaptive", *geometry, "--masking", "adaptive", "--seed", "5"
    )
    assert code == 0, err
    assert "initialised 14 sampler tensors" in stdout
    adaptive = load_model(tmp_path / "adaptive")
    report = json.loads((tmp_path / "adaptive" / "config.json").read_text())["import_report"]
    assert set(report["initialised"]) == {k for k in adaptive.state_dict() if k.startswith("sampler.")}
    assert torch.count_nonzero(adaptive.sampler.pos_embed_probs) == 0  # the reference initialisation
    with torch.no_grad():
        out = adaptive(video, mask=mask)
    assert out.logits is not None
    torch.testing.assert_close(out.pred, pred, rtol=0, atol=1e-5)


def test_adamae_checkpoint_can_drop_its_sampler_for_random_masking(tmp_path, capsys):
    sd = reference_state_dict(adaptive=True)
    src = tmp_path / "checkpoint-1.pth"
    save_reference_checkpoint(src, sd, args=reference_args())
    code, stdout, err = convert_cli(capsys, "import", src, tmp_path / "out", "--masking", "random")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "config.json").read_text())["import_report"]
    assert len(report["dropped"]) == 14 and all(
        "--masking random has no sampler" in v for v in report["dropped"].values()
    )
    assert report["kept"] + len(report["renamed"]) + len(report["dropped"]) == len(sd)


def test_import_refuses_what_it_cannot_place_with_one_line(tmp_path, capsys):
    def attempt(state, *options, args=None):
        src = tmp_path / "ckpt.pth"
        save_reference_checkpoint(src, state, args=args)
        code, _, err = convert_cli(capsys, "import", src, tmp_path / "never", *options)
        assert code == 2
        return one_line_error(err)

    sd = reference_state_dict(adaptive=True)
    geometry = ("--num-frames", FRAMES, "--img-size", SIZE)
    assert "learned position embedding" in attempt(
        {**sd, "encoder.pos_embed": torch.randn(1, NUM_TOKENS, DIM)}, *geometry
    )
    assert "fine-tuned checkpoint" in attempt({**sd, "encoder.head.weight": torch.randn(10, DIM)}, *geometry)
    assert "layer-scale" in attempt({**sd, "encoder.blocks.0.gamma_1": torch.ones(DIM)}, *geometry)
    assert "does not know: encoder.extra_thing" in attempt({**sd, "encoder.extra_thing": torch.ones(3)}, *geometry)
    finetuned = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    assert "no 'encoder.*' keys" in attempt(finetuned)

    # Another architecture than the one asked for, or a geometry the weights do not fit.
    line = attempt(sd, "--model", "vit_small", args=reference_args())
    assert "does not match --model vit_small" in line and "embed_dim 192 (--model vit_small has 384)" in line
    assert "covers 32 tokens, but 8 frames of 32x32 make 64" in attempt(sd, "--num-frames", "8", args=reference_args())
    assert "--patch-size 16 does not match" in attempt(sd, "--patch-size", "16", args=reference_args())
    assert "covers 32 tokens" in attempt(sd)  # no args: 16 frames of 224x224 by default
    assert "cannot tell the number of attention heads of a 96-wide encoder" in attempt(
        reference_state_dict(adaptive=False, dim=96), *geometry
    )
    assert "--num-heads 5 does not divide the width 96" in attempt(
        reference_state_dict(adaptive=False, dim=96), *geometry, "--num-heads", "5"
    )

    code, _, err = convert_cli(capsys, "import", tmp_path / "missing.pth", tmp_path / "out")
    assert code == 2 and "missing.pth: no such file" in one_line_error(err)
    code, _, err = convert_cli(capsys, "import", tmp_path, tmp_path / "out")
    assert code == 2 and "is a folder" in one_line_error(err)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    code, _, err = convert_cli(capsys, "import", tmp_path / "notes.pth", tmp_path / "out")
    assert code == 2 and "notes.pth: not a PyTorch checkpoint" in one_line_error(err)
    assert not (tmp_path / "never").exists() and not (tmp_path / "out").exists()


def test_an_odd_width_imports_with_explicit_head_counts(tmp_path, capsys):
    sd = reference_state_dict(adaptive=False, dim=96)
    src = tmp_path / "ckpt.pth"
    save_reference_checkpoint(src, sd)
    code, _, err = convert_cli(
        capsys, "import", src, tmp_path / "out", "--num-frames", FRAMES, "--img-size", SIZE, "--num-heads", "4"
    )
    assert code == 0, err
    model = load_model(tmp_path / "out")
    video, mask = inputs(num_visible=4)
    with torch.no_grad():
        pred, _ = reference_forward(sd, video, mask, dim=96, heads=4)
        torch.testing.assert_close(model(video, mask=mask).pred, pred, rtol=0, atol=1e-5)


class _RunsShell:
    """Un-pickling this runs a shell command (the classic ``__reduce__`` attack)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, capsys, container):
    marker = tmp_path / "pwned"
    payload = {"model": reference_state_dict(adaptive=True), "args": _RunsShell(f"touch {marker}")}
    src = tmp_path / "checkpoint-0.pth"
    if container == "torch-zip":
        torch.save(payload, src)
    elif container == "torch-legacy":
        torch.save(payload, src, _use_new_zipfile_serialization=False)
    else:
        with open(src, "wb") as f:
            pickle.dump(payload, f)

    # The payload is live: an unrestricted torch.load runs it.
    unsafe = f"import torch; torch.load({str(src)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe], cwd=REPO, env=cli_env(), capture_output=True, timeout=120)
    assert marker.exists()
    marker.unlink()

    code, _, err = convert_cli(capsys, "import", src, tmp_path / "out")
    assert code == 2
    line = one_line_error(err)
    assert "refusing to load" in line and "system" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_checkpoint_args_namespace_is_the_only_extra_class_allowed(tmp_path, capsys):
    sd = reference_state_dict(adaptive=True)
    src = tmp_path / "ckpt.pth"
    save_reference_checkpoint(src, sd, args=reference_args(output_dir=pathlib.Path("/ckpt")))  # a class inside args
    code, _, err = convert_cli(capsys, "import", src, tmp_path / "out")
    assert code == 2 and "references pathlib.PosixPath" in one_line_error(err)
