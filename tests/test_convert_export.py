"""``export-encoder`` and ``to-hf`` on full-model folders (here written from a randomly initialised AdaMAE with a
non-square clip), and the command line itself: ``--help`` everywhere, one-line errors for wrong paths."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import Block as TimmBlock

from adamae_scale.convert.folder import FORMAT_FULL, FORMAT_VERSION, load_model, write_folder
from adamae_scale.models import AdaMAE, config_for
from adamae_scale.models.adamae import Encoder
from adamae_scale.models.layers import sincos_table_1d

from .conftest import REPO, cli_env, convert_cli, one_line_error

SUBCOMMANDS = ("consolidate", "export-encoder", "import", "to-hf")


def random_model(**overrides) -> AdaMAE:
    """A small AdaMAE whose every parameter is random (not the structured init), so parity tests see real values."""
    values = dict(depth=2, decoder_depth=2, num_frames=4, img_size=(32, 48), patch_size=8, mask_ratio=0.75)
    values.update(overrides)
    torch.manual_seed(0)
    model = AdaMAE(config_for("vit_tiny", **values))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.ndim == 1 or name.endswith("pos_embed_probs"):
                param.copy_(0.05 * torch.randn_like(param))
            else:
                param.copy_(
                    torch.randn_like(param) * param.shape[-1] ** -0.5
                    if param.ndim == 2
                    else 0.02 * torch.randn_like(param)
                )
    return model.eval()


def write_full_folder(folder: Path, model: AdaMAE) -> Path:
    folder.mkdir()
    write_folder(
        folder,
        model.state_dict(),
        {"format": FORMAT_FULL, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict()},
        torch.float32,
    )
    return folder


def random_inputs(cfg, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 3, cfg.num_frames, *cfg.img_size, generator=generator)
    visible = torch.stack(
        [torch.randperm(cfg.num_tokens, generator=generator)[: cfg.num_visible] for _ in range(batch)]
    )
    mask = torch.ones(batch, cfg.num_tokens, dtype=torch.bool).scatter(1, visible, False)
    return video, mask, torch.sort(visible, dim=1).values


def file_order(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.offset_keys())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    model = random_model()
    return write_full_folder(tmp_path_factory.mktemp("full") / "model", model), model


def test_to_hf_output_loads_in_transformers_and_matches_on_a_non_square_clip(full, tmp_path, capsys):
    import transformers  # the test extra installs it: this test runs in CI, never skipped

    folder, model = full
    assert model.cfg.img_size == (32, 48)
    code, out, err = convert_cli(capsys, "to-hf", folder, tmp_path / "hf")
    assert code == 0, err
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "videomae" and hf_config["architectures"] == ["VideoMAEForPreTraining"]
    assert hf_config["image_size"] == [32, 48] and hf_config["use_mean_pooling"] is False
    assert "sampler" not in " ".join(load_file(tmp_path / "hf" / "model.safetensors"))

    hf_model, info = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    video, mask, _ = random_inputs(model.cfg)
    with torch.no_grad():
        ours = model(video, mask=mask).pred
        theirs = hf_model(pixel_values=video.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
    assert theirs.shape == ours.shape and ours.abs().mean() > 0.1
    assert (theirs - ours).abs().max().item() < 1e-4


def test_export_encoder_native_layout_is_the_encoder_state_dict(full, tmp_path, capsys):
    folder, model = full
    code, out, err = convert_cli(capsys, "export-encoder", folder, tmp_path / "enc", "--dtype", "bf16")
    assert code == 0, err
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert (config["format"], config["key_layout"], config["dtype"]) == ("adamae-encoder", "adamae", "bfloat16")
    assert config["encoder"]["token_grid"] == [2, 4, 6] and config["encoder"]["num_heads"] == 3
    weights = load_file(tmp_path / "enc" / "model.safetensors")
    assert file_order(tmp_path / "enc" / "model.safetensors") == list(model.encoder.state_dict())  # nothing else
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name

    code, _, err = convert_cli(capsys, "export-encoder", folder, tmp_path / "enc32")
    assert code == 0, err
    encoder = Encoder(model.cfg).eval()
    encoder.load_state_dict(load_file(tmp_path / "enc32" / "model.safetensors"), strict=True)
    video, _, visible_idx = random_inputs(model.cfg)
    with torch.no_grad():
        assert torch.equal(
            encoder(encoder.patch_embed(video), visible_idx),
            model.encoder(model.encoder.patch_embed(video), visible_idx),
        )


def test_export_encoder_timm_layout_runs_in_timm_blocks(full, tmp_path, capsys):
    folder, model = full
    cfg = model.cfg
    code, _, err = convert_cli(capsys, "export-encoder", folder, tmp_path / "timm", "--key-layout", "timm")
    assert code == 0, err
    weights = load_file(tmp_path / "timm" / "model.safetensors")
    assert not any(name.endswith(("q_bias", "v_bias")) for name in weights)
    torch.testing.assert_close(weights["pos_embed"], sincos_table_1d(cfg.num_tokens, cfg.embed_dim), rtol=0, atol=0)

    blocks = torch.nn.ModuleList(
        TimmBlock(
            cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)
        )
        for _ in range(cfg.depth)
    ).eval()
    blocks.load_state_dict({k[len("blocks.") :]: v for k, v in weights.items() if k.startswith("blocks.")}, strict=True)
    norm = torch.nn.LayerNorm(cfg.embed_dim, eps=1e-6)
    norm.load_state_dict({"weight": weights["norm.weight"], "bias": weights["norm.bias"]})
    conv = torch.nn.Conv3d(
        cfg.in_chans,
        cfg.embed_dim,
        (cfg.tubelet_size, cfg.patch_size, cfg.patch_size),
        stride=(cfg.tubelet_size, cfg.patch_size, cfg.patch_size),
    )
    conv.load_state_dict({"weight": weights["patch_embed.proj.weight"], "bias": weights["patch_embed.proj.bias"]})

    video, _, visible_idx = random_inputs(cfg)
    with torch.no_grad():
        x = conv(video).flatten(2).transpose(1, 2) + weights["pos_embed"]
        x = torch.gather(x, 1, visible_idx[..., None].expand(-1, -1, cfg.embed_dim))
        for block in blocks:
            x = block(x)
        ours = model.encoder(model.encoder.patch_embed(video), visible_idx)
    torch.testing.assert_close(norm(x), ours, rtol=1e-5, atol=1e-5)


def test_every_command_has_complete_help():
    def help_of(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "adamae_scale.convert.cli", *args, "--help"],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
        return proc.stdout

    top = help_of()
    assert all(command in top for command in SUBCOMMANDS)
    expected = {
        "consolidate": ["CKPT_DIR", "OUT_DIR", "--tag", "--dtype", "--model", "--num-frames", "--overwrite", "ZeRO"],
        "export-encoder": ["SRC", "OUT_DIR", "--key-layout", "blocks.{i}.attn.q_bias", "timm", "--overwrite"],
        "import": ["SRC.pth", "OUT_DIR", "--model", "--num-heads", "--img-size", "--masking", "weights_only", "--seed"],
        "to-hf": ["SRC", "OUT_DIR", "VideoMAEForPreTraining", "--no-norm-pix-loss", "--overwrite"],
    }
    for command, words in expected.items():
        text = help_of(command)
        missing = [w for w in words if w not in text]
        assert not missing, f"{command} --help lacks {missing}"

    # The thin wrapper in tools/ and the installed console script are the same command.
    wrapper = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), "to-hf", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrapper.returncode == 0 and "VideoMAEForPreTraining" in wrapper.stdout
    script = Path(sys.executable).with_name("adamae-convert")  # installed by `pip install -e .` (make setup)
    proc = subprocess.run([str(script), "--help"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "consolidate" in proc.stdout


def test_wrong_or_missing_paths_and_usage_errors_are_one_line(full, tmp_path, capsys):
    folder, model = full
    code, _, err = convert_cli(capsys, "export-encoder", tmp_path / "nowhere", tmp_path / "out")
    assert code == 2 and "SRC" in one_line_error(err) and "no such folder" in err
    code, _, err = convert_cli(capsys, "to-hf", folder / "model.safetensors", tmp_path / "out")
    assert code == 2 and "is a file" in one_line_error(err)
    deepspeed_like = tmp_path / "run" / "checkpoints"
    deepspeed_like.mkdir(parents=True)
    (deepspeed_like / "latest").write_text("step_00000002")
    code, _, err = convert_cli(capsys, "to-hf", deepspeed_like, tmp_path / "out")
    assert code == 2 and "is a DeepSpeed checkpoint; run 'adamae-convert consolidate" in one_line_error(err)
    code, _, err = convert_cli(capsys, "export-encoder", tmp_path, tmp_path / "out")
    assert code == 2 and "has no model.safetensors + config.json" in one_line_error(err)

    assert convert_cli(capsys, "export-encoder", folder, tmp_path / "enc")[0] == 0
    code, _, err = convert_cli(capsys, "to-hf", tmp_path / "enc", tmp_path / "out")
    assert code == 2 and "holds an encoder-only export, but this command needs a full model" in one_line_error(err)
    code, _, err = convert_cli(capsys, "export-encoder", folder, tmp_path / "enc")
    assert code == 2 and "already exists (pass --overwrite" in one_line_error(err)

    for args, message in [
        ((), "the following arguments are required: COMMAND"),
        (
            ("consolidate",),
            "the following arguments are required: CKPT_DIR, OUT_DIR (see 'adamae-convert consolidate --help')",
        ),
        (("convert-all", "a", "b"), "invalid choice: 'convert-all'"),
        (
            ("import", "a.pth", "out", "--num-frames", "zero"),
            "argument --num-frames: expected a positive integer, got 'zero'",
        ),
        (("export-encoder", str(folder), "out", "--key-layout", "hf"), "argument --key-layout: invalid choice"),
        (("import", "a.pth", "out", "--img-size", "1", "2", "3"), "--img-size takes one value or HEIGHT WIDTH"),
    ]:
        code, _, err = convert_cli(capsys, *args)
        assert code == 2 and message in one_line_error(err), (args, err)
    assert not (tmp_path / "out").exists()


def test_to_hf_refuses_a_model_hf_cannot_represent(tmp_path, capsys):
    folder = write_full_folder(tmp_path / "model3d", random_model(pos_embed="sincos_3d", decoder_embed_dim=96))
    code, _, err = convert_cli(capsys, "to-hf", folder, tmp_path / "hf")
    assert code == 2 and "uses sincos_3d" in one_line_error(err)
    # A folder whose weights do not fit its own config.json is refused, naming the first difference.
    config = json.loads((folder / "config.json").read_text())
    config["model"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = convert_cli(capsys, "export-encoder", folder, tmp_path / "enc")
    assert code == 2 and "missing encoder.blocks.2" in one_line_error(err)


def test_load_model_round_trip_of_a_written_folder(full):
    folder, model = full
    loaded = load_model(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
