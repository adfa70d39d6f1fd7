"""Frozen-encoder evaluation: the attentive probe (pooler shapes, its state in checkpoints, exact resume), the
feature cache (equal to a fresh forward) and the lr sweep (heads independent of each other), on a random
encoder of the tiny shape (``init=none``: no pre-training needed to test the machinery)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from adamae_scale import schema
from adamae_scale.data import build_data
from adamae_scale.engine import setup
from adamae_scale.finetune import features
from adamae_scale.finetune.features import FeatureCache, fill_train, fill_val
from adamae_scale.finetune.recipe import param_groups
from adamae_scale.finetune.run import validate
from adamae_scale.finetune.sweep import HeadSetting, cache_identity, train_heads
from adamae_scale.finetune.views import rank_views
from adamae_scale.models import config_for, make_config
from adamae_scale.models.classifier import ProbeHead, VideoClassifier
from adamae_scale.models.pooler import AttentiveSpec

from .conftest import convert_cli, one_line_error
from .test_finetune import TINY_FT, checkpoint_state, losses, run_finetune

RANDOM_ENCODER = ["init=none", "model=vit_tiny", "model.depth=2", "model.num_frames=4", "model.img_size=[32,32]"]
RANDOM_ENCODER += ["model.patch_size=8"]
ATTENTIVE = [*TINY_FT, *RANDOM_ENCODER, "finetune.mode=attentive", "finetune.pooler_queries=2", "eval.temporal_views=1"]


def test_attentive_pooler_reads_every_token_and_only_it_and_the_head_train():
    torch.manual_seed(0)
    cfg = config_for("vit_tiny", depth=1, num_frames=4, img_size=(16, 16), patch_size=8)  # 8 tokens of 192
    model = VideoClassifier(cfg, 5, attentive=AttentiveSpec(queries=3, num_heads=4)).eval()
    video = torch.randn(2, 3, 4, 16, 16)
    tokens = model.probe_input(video)
    assert tokens.shape == (2, 8, 192) and model.pooler is not None
    assert model.pooler.queries.shape == (1, 3, 192) and model.pooler(tokens).shape == (2, 192)
    assert model(video).shape == (2, 5) and model.features(video).shape == (2, 192)
    with torch.no_grad():  # the pooler reads every token: changing the last one changes the logits
        changed = tokens.clone()
        changed[:, -1] = torch.randn(2, 192)
        assert not torch.allclose(model.read_out(tokens), model.read_out(changed))
        torch.testing.assert_close(model.read_out(tokens), model(video))
    names = [n for n, _ in model.named_parameters()]
    assert names.index("pooler.queries") > names.index("blocks.0.mlp.fc2.bias")  # the classifier's last layer
    trained = {id(p) for g in param_groups(model, "attentive", 0.05, 0.75) for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in trained} == {
        n for n in names if n.startswith(("pooler.", "fc_norm.", "head."))
    }
    mean = VideoClassifier(cfg, 5)  # the linear probe reads the token mean
    assert mean.probe_input(video).shape == (2, 192) and mean.pooler is None
    with pytest.raises(ValueError, match="finetune.pooler_heads=5: expected an integer >= 1 dividing"):
        validate(schema.compose([*ATTENTIVE, "finetune.pooler_heads=5"], config_name="finetune"))


def test_attentive_probe_checkpoints_its_pooler_and_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_finetune(*ATTENTIVE, "train.steps=4", "train.ckpt_every=2", f"run_dir={straight}")
    assert "finetune (attentive)" in proc.stdout
    run_finetune(*ATTENTIVE, "train.steps=4", "train.ckpt_every=2", "train.stop_after=2", f"run_dir={resumed}")
    run_finetune(*ATTENTIVE, "train.steps=4", "train.ckpt_every=2", f"run_dir={resumed}")
    assert losses(resumed) == losses(straight)
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())
    first, last = checkpoint_state(straight, 2)["module"], checkpoint_state(straight, 4)["module"]
    assert first["pooler.queries"].shape == (1, 2, 192) and "pooler.kv.weight" in first
    assert not torch.equal(first["pooler.kv.weight"], last["pooler.kv.weight"])  # the pooler trains
    assert torch.equal(first["blocks.1.attn.qkv.weight"], last["blocks.1.attn.qkv.weight"])  # the encoder not
    model = load_file(straight / "model" / "model.safetensors")
    assert all(torch.equal(model[name], last[name]) for name in last)  # RUN_DIR/model keeps the pooler
    config = json.loads((straight / "model" / "config.json").read_text())
    assert config["attentive"] == {"queries": 2, "num_heads": 3}
    # consolidate rebuilds the same folder from the checkpoint; to-hf refuses it in one line.
    code, stdout, stderr = convert_cli(capsys, "consolidate", straight, tmp_path / "consolidated")
    assert code == 0 and "attentive pooler (2 queries, 3 heads)" in stdout, stderr
    again = load_file(tmp_path / "consolidated" / "model.safetensors")
    assert again.keys() == model.keys() and all(torch.equal(again[n], model[n]) for n in model)
    code, _, stderr = convert_cli(capsys, "to-hf", straight / "model", tmp_path / "hf")
    assert code == 2 and "is an attentive probe" in one_line_error(stderr) and not (tmp_path / "hf").exists()


def test_cached_features_equal_a_fresh_forward_and_sweep_heads_are_independent(tmp_path):
    run_dir = tmp_path / "sweep"
    sweep = [*TINY_FT, *RANDOM_ENCODER, "finetune.mode=attentive", "train.steps=6", "train.micro_batch_size=8"]
    sweep += ["finetune.cache_clips=20", "eval.temporal_views=1", "eval.spatial_views=2", "eval.videos=5"]
    proc = run_finetune(*sweep, "finetune.lr_sweep=[0.05,0.5]", "finetune.wd_sweep=[0.0,0.1]", f"run_dir={run_dir}")
    assert proc.stdout.count("[adamae] sweep: base lr") == 4
    report = json.loads((run_dir / "sweep.json").read_text())
    assert [(h["base_lr"], h["weight_decay"]) for h in report["heads"]] == [
        (0.05, 0),
        (0.05, 0.1),
        (0.5, 0),
        (0.5, 0.1),
    ]
    assert report["train_clips"] == 20 and report["videos"] == 5 and report["feature_shape"] == [32, 192]
    assert report["cache_bytes_per_view"]["train"] >= 32 * 192 * 4  # fp32 tokens, plus the file's header
    best = report["heads"][report["best"]]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["top1"] == best["top1"] == max(h["top1"] for h in report["heads"]) and result["videos"] == 5

    # The cache holds what the frozen encoder gives, fresh: training clips and each held-out video's views.
    cfg = schema.compose([*sweep, "finetune.lr_sweep=[0.05]", f"run_dir={run_dir}"], config_name="finetune")
    checked, source, model_cfg, classes = validate(cfg)
    cache = FeatureCache(run_dir / "features", cache_identity(checked, source, model_cfg))  # the same identity
    folder = json.loads((run_dir / "model" / "config.json").read_text())
    model = VideoClassifier(make_config(folder["model"]), classes, attentive=AttentiveSpec(1, 3)).eval()
    model.load_state_dict(load_file(run_dir / "model" / "model.safetensors"))
    train = cache.load("train")
    stream = build_data(checked.data, model_cfg, 20, 0, 1)
    clips = next(stream)
    stream.close()
    with torch.no_grad():
        torch.testing.assert_close(train.features, model.probe_input(clips["video"]), rtol=1e-5, atol=1e-5)
    assert torch.equal(train.labels, clips["label"])
    val = cache.load("val")
    assert val.features.shape == (5, 2, 32, 192) and val.keys == [f"synthetic-{i:06d}" for i in range(5)]

    # A head of a sweep ends the same, bit for bit, when trained alone.
    def make_head():
        return ProbeHead(192, classes, 0.001, 0.0, AttentiveSpec(1, 3))

    together = train_heads(train, [HeadSetting(0.05, 0.0), HeadSetting(0.5, 0.1)], make_head, checked)
    alone = train_heads(train, [HeadSetting(0.5, 0.1)], make_head, checked)
    for name, tensor in alone[0].state_dict().items():
        assert torch.equal(tensor, together[1].state_dict()[name]), name
    assert not torch.equal(together[0].head.weight, together[1].head.weight)

    # Another encoder's run refuses the cache in one line.
    other = [o for o in sweep if o != "model.depth=2"] + ["model.depth=1", f"finetune.cache_dir={run_dir / 'features'}"]
    proc = run_finetune(*other, "finetune.lr_sweep=[0.05]", f"run_dir={tmp_path / 'other'}", check=False)
    assert proc.returncode == 2 and "holds features of another encoder" in proc.stderr


class Stopped(Exception):
    """The run stopped (a signal, a pre-emption) right after a shard of the cache landed."""


def test_a_feature_cache_stopped_after_a_shard_resumes_to_the_same_features(tmp_path, monkeypatch):
    """A sweep stopped while filling its cache resumes at the last whole shard: the training stream from the data
    state stored with that shard, the held-out videos already stored passed over. Stopped once in each split and
    resumed, the cache equals one filled in one go, bit for bit."""
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 8)  # several shards from a small set
    monkeypatch.setattr(features, "VIDEOS_PER_SHARD", 2)
    probe = [*TINY_FT, *RANDOM_ENCODER, "finetune.mode=linear", "finetune.lr_sweep=[0.1]", "finetune.cache_clips=20"]
    probe += ["eval.temporal_views=1", "eval.spatial_views=2", "eval.videos=5", f"run_dir={tmp_path / 'run'}"]
    cfg, source, model_cfg, classes = validate(schema.compose(probe, config_name="finetune"))
    torch.manual_seed(0)
    model = VideoClassifier(model_cfg, classes).eval()
    train_data = dataclasses.replace(cfg.data, repeated_aug=1)

    def encode(video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.probe_input(video)

    def fill(folder, log):
        cache = FeatureCache(folder, cache_identity(cfg, source, model_cfg))
        fill_train(cache, encode, lambda: build_data(train_data, model_cfg, 4, 0, 1), 20, torch.float32, log)
        views = lambda done, skipped: rank_views(cfg, model_cfg, setup.dist_env(), skipped, done)  # noqa: E731
        fill_val(cache, encode, views, 2, 4, torch.float32, log)
        return cache

    lines: list[str] = []

    def stop_at(marker: str):
        def log(line: str) -> None:
            lines.append(line)
            if marker in line:
                raise Stopped(line)

        return log

    with pytest.raises(Stopped):
        fill(tmp_path / "stopped", stop_at("8/20 training clips"))
    with pytest.raises(Stopped):
        fill(tmp_path / "stopped", stop_at("held-out videos"))
    resumed = fill(tmp_path / "stopped", lines.append)
    # Each shard was encoded once: the resumed runs went on from where the stopped ones had got to.
    assert [line.split("feature cache: ")[1] for line in lines] == [
        "8/20 training clips",
        "16/20 training clips",
        "20/20 training clips",
        "2 held-out videos",
        "4 held-out videos",
        "5 held-out videos",
    ]
    whole = fill(tmp_path / "whole", lambda line: None)
    for split in ("train", "val"):
        got, want = resumed.load(split), whole.load(split)
        assert torch.equal(got.features, want.features) and torch.equal(got.labels, want.labels), split
        assert (got.keys, got.sources, got.index) == (want.keys, want.sources, want.index), split
    assert resumed.load("val").features.shape == (5, 2, 192)
