"""``adamae-finetune``: sources, the recipe's pieces (repeated augmentation, model EMA included), multi-view
evaluation, and real runs (1 and 2 ranks)."""

import json
import random
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adamae_scale import schema
from adamae_scale.data.transforms import rand_augment_clip
from adamae_scale.finetune import evaluate
from adamae_scale.finetune.ema import ClassifierEma
from adamae_scale.finetune.recipe import ClipMixup, erase_frames, param_groups
from adamae_scale.finetune.run import validate
from adamae_scale.finetune.sources import classifier_config, classifier_state, load_source
from adamae_scale.metrics import read_metrics
from adamae_scale.models import config_for, make_config
from adamae_scale.models.classifier import VideoClassifier

from .conftest import TINY_RUN, _run, convert_cli, one_line_error, run_pretrain, torchrun_cmd
from .test_convert_import import reference_args, reference_state_dict, save_reference_checkpoint

FINETUNE = ("-m", "adamae_scale.finetune")
# A short fine-tuning run on the synthetic motion task, in fp32 so that a resume is bit-exact.
TINY_FT = [
    "data.label_task=motion",
    "train.micro_batch_size=4",
    "train.base_lr=0.05",
    "precision=fp32",
    "ds=zero0",
    "eval.videos=7",
    "eval.micro_batch_size=6",
]


def run_finetune(*overrides: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *FINETUNE, *overrides] if nproc == 1 else torchrun_cmd(nproc, *overrides, target=FINETUNE)
    return _run(cmd, check, 400)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def checkpoint_state(run_dir, step):
    """The model-states file of a run's checkpoint (module weights and the client state, the EMA included)."""
    from adamae_scale.base.weights import DEEPSPEED_GLOBALS, safe_torch_load

    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return safe_torch_load(path, DEEPSPEED_GLOBALS)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pre-training run, consolidated, and its encoder exported in both key layouts."""
    root = tmp_path_factory.mktemp("pretrained")
    run_pretrain(
        *TINY_RUN, "precision=fp32", "ds=zero0", "train.steps=2", "eval.focus_batches=0", f"run_dir={root / 'run'}"
    )
    from adamae_scale.convert import cli

    assert cli.main(["consolidate", str(root / "run" / "checkpoints"), str(root / "full")]) == 0
    for layout in ("adamae", "timm"):
        args = ["export-encoder", str(root / "full"), str(root / f"encoder-{layout}"), "--key-layout", layout]
        assert cli.main(args) == 0
    return root


def classifier_weights(source_path):
    source = load_source(str(source_path))
    cfg = classifier_config(source, None, {}, 0.0)
    model = VideoClassifier(cfg, 4)
    state, report = classifier_state(source, {n: p.shape for n, p in model.named_parameters()})
    return state, report, cfg


# -- sources --------------------------------------------------------------------------------------------------------
def test_every_source_kind_loads_the_same_encoder_and_reports_its_keys(pretrained, tmp_path):
    full = load_file(pretrained / "full" / "model.safetensors")
    expected = {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.") and ".norm." not in k[8:]}
    expected = {k: v for k, v in expected.items() if not k.startswith("norm.")}
    for folder in ("full", "encoder-adamae", "encoder-timm"):
        state, report, cfg = classifier_weights(pretrained / folder)
        assert state.keys() == expected.keys(), folder
        assert all(torch.equal(state[k], expected[k]) for k in expected), folder
        assert report.new == ["fc_norm", "head"] and "norm.weight" in report.dropped
        assert cfg.num_frames == 4 and cfg.img_size == (32, 32) and cfg.depth == 2
    _, report, _ = classifier_weights(pretrained / "full")
    assert sum("sampler" in why for why in report.dropped.values()) > 0  # the sampler and decoder are dropped
    assert sum("decoder" in why for why in report.dropped.values()) > 0

    # A reference AdaMAE pre-training checkpoint, through the importer's safe loader.
    sd = reference_state_dict(adaptive=True)
    src = tmp_path / "checkpoint-799.pth"
    save_reference_checkpoint(src, sd, args=reference_args())
    state, report, cfg = classifier_weights(src)
    assert torch.equal(state["blocks.1.attn.q_bias"], sd["encoder.blocks.1.attn.q_bias"])
    assert torch.equal(state["patch_embed.proj.weight"], sd["encoder.patch_embed.proj.weight"])
    assert "reference checkpoint" in report.kind and cfg.embed_dim == 192


def test_another_clip_size_keeps_the_weights_and_recomputes_the_position_table(pretrained):
    source = load_source(str(pretrained / "encoder-adamae"))
    cfg = classifier_config(source, None, {"num_frames": 8, "img_size": 48}, 0.1)
    assert cfg.layout.grid == (4, 6, 6) and cfg.drop_path == 0.1
    model = VideoClassifier(cfg, 4)
    state, report = classifier_state(source, {n: p.shape for n, p in model.named_parameters()})
    assert len(state) == len(report.loaded) > 20 and "recomputed for the 4x6x6 token grid" in report.notes[0]
    model.load_state_dict(state, strict=False)
    assert model(torch.randn(2, 3, 8, 48, 48)).shape == (2, 4)


def test_scratch_needs_a_model_and_bad_sources_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="init=none needs a model"):
        classifier_config(load_source("none"), None, {}, 0.1)
    proc = run_finetune(*TINY_FT, f"init={tmp_path / 'missing'}", f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "init=" in proc.stderr and "no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    odd = schema.compose([*TINY_FT, "model=vit_tiny", "train.micro_batch_size=3"], config_name="finetune")
    with pytest.raises(ValueError, match="train.micro_batch_size=3: mixup/cutmix pair each clip"):
        validate(odd)
    with pytest.raises(ValueError, match="finetune.mode='probe': expected one of"):
        validate(schema.compose([*TINY_FT, "model=vit_tiny", "finetune.mode=probe"], config_name="finetune"))
    # train.micro_batch_size counts views: a whole number of clips, repeated_aug views each.
    odd = schema.compose([*TINY_FT, "model=vit_tiny", "finetune.repeated_aug=3"], config_name="finetune")
    with pytest.raises(ValueError, match=r"^train.micro_batch_size=4: it counts views, finetune.repeated_aug=3 "):
        validate(odd)
    probe = [*TINY_FT, "model=vit_tiny", "finetune.repeated_aug=3", "finetune.mode=linear"]
    _, _, probe_model, _ = validate(schema.compose(probe, config_name="finetune"))  # no augmentation to repeat
    _, _, full_model, _ = validate(schema.compose([*TINY_FT, "model=vit_tiny"], config_name="finetune"))
    assert (probe_model.drop_path, full_model.drop_path) == (0.0, 0.1)  # a frozen encoder drops no paths
    pretraining_field = schema.compose([*TINY_FT, "model=vit_tiny", "+data.repeated_aug=2"], config_name="finetune")
    with pytest.raises(ValueError, match=r"^data.repeated_aug=2: fine-tuning repeats clips by finetune.repeated_aug"):
        validate(pretraining_field)
    zero3 = schema.compose([*TINY_FT, "model=vit_tiny", "ds=zero3", "finetune.model_ema=true"], config_name="finetune")
    with pytest.raises(
        ValueError, match=r"^finetune.model_ema=true needs the full weights on every rank, .* \(ZeRO-3\)"
    ):
        validate(zero3)
    with pytest.raises(ValueError, match="finetune.model_ema_decay=1.0: expected a number in"):
        validate(schema.compose([*TINY_FT, "model=vit_tiny", "finetune.model_ema_decay=1.0"], config_name="finetune"))


# -- the recipe -----------------------------------------------------------------------------------------------------
def test_layer_decay_scales_the_lr_of_every_block():
    cfg = config_for("vit_tiny", depth=4, num_frames=4, img_size=(32, 32), patch_size=8)
    model = VideoClassifier(cfg, 5)
    scale_of = {}
    for group in param_groups(model, "full", 0.05, 0.75):
        for param in group["params"]:
            scale_of[param] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    depth = cfg.depth
    assert scale_of[named["patch_embed.proj.weight"]] == pytest.approx((0.75 ** (depth + 1), 0.05))
    for i in range(depth):
        assert scale_of[named[f"blocks.{i}.attn.qkv.weight"]] == pytest.approx((0.75 ** (depth - i), 0.05))
        assert scale_of[named[f"blocks.{i}.norm1.bias"]] == pytest.approx((0.75 ** (depth - i), 0.0))
    assert scale_of[named["head.weight"]] == pytest.approx((1.0, 0.05))
    assert scale_of[named["fc_norm.weight"]] == pytest.approx((1.0, 0.0))

    linear = param_groups(VideoClassifier(cfg, 5), "linear", 0.05, 0.75)
    trainable = {id(p) for g in linear for p in g["params"]}
    assert len(trainable) == 2  # head.weight and head.bias only


def test_cutmix_box_spans_height_and_width_of_every_frame_and_mixup_mixes_whole_clips():
    torch.manual_seed(0)
    video = torch.randn(4, 3, 6, 16, 20)
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(6):
        np.random.seed(seed)
        mixed, target = ClipMixup(0.0, 1.0, 0.5, 0.0, 4)(video, labels)  # cutmix only
        changed = (mixed != video).any(dim=(0, 1))  # (T, H, W): where any clip changed
        assert torch.equal(changed, changed[:1].expand_as(changed))  # the same box in every frame
        rows, cols = changed[0].any(1).nonzero(), changed[0].any(0).nonzero()
        if rows.numel():
            box = changed[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert bool(box.all())  # a rectangle over (H, W)
            inside = changed[0].float().mean()
            assert float(target[0, 0]) == pytest.approx(1 - float(inside), abs=1e-6)  # λ = area kept
            assert torch.equal(mixed[0][:, :, changed[0]], video[3][:, :, changed[0]])  # pasted from the flip
    np.random.seed(0)
    mixed, target = ClipMixup(0.8, 0.0, 0.5, 0.0, 4)(video, labels)  # mixup only
    lam = float(target[0, 0])
    torch.testing.assert_close(mixed, lam * video + (1 - lam) * video.flip(0))
    assert torch.equal(video, video.clone())  # the input batch is left alone


def test_rand_augment_is_the_same_on_every_frame_and_erasing_differs_per_frame():
    frame = torch.randint(0, 256, (3, 1, 24, 32), dtype=torch.uint8)
    clip = frame.expand(3, 6, 24, 32).contiguous()  # six identical frames
    outputs = [rand_augment_clip(clip, "rand-m7-n4-mstd0.5-inc1", seed) for seed in range(8)]
    for out in outputs:
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[:, t], out[:, 0]) for t in range(6))  # one draw of ops for the whole clip
    assert len({out.numpy().tobytes() for out in outputs}) > 1  # ... and another draw for another seed
    assert torch.equal(outputs[3], rand_augment_clip(clip, "rand-m7-n4-mstd0.5-inc1", 3))

    video = torch.zeros(2, 3, 5, 16, 16)
    random.seed(0)
    erased = erase_frames(video, 1.0)
    assert torch.equal(video, torch.zeros_like(video))  # the input is left alone
    boxes = (erased != 0).any(1)  # (B, T, H, W)
    assert all(bool(boxes[b, t].any()) for b in range(2) for t in range(5))  # every frame erased
    assert not all(torch.equal(boxes[0, t], boxes[0, 0]) for t in range(5))  # independently per frame
    with pytest.raises(ValueError, match="finetune.rand_augment='bogus': not a timm RandAugment policy"):
        validate(schema.compose([*TINY_FT, "model=vit_tiny", "finetune.rand_augment=bogus"], config_name="finetune"))


def test_synthetic_repeated_augmentation_renders_each_clip_once_for_its_views():
    from adamae_scale.data.synthetic import SyntheticClips, SyntheticConfig

    cfg = SyntheticConfig(num_frames=4, img_size=(16, 16), patch_size=8, label_task="motion")
    plain = SyntheticClips(cfg, 3, rank=1, world_size=2, prefetch=0).batch(1)  # clips 9, 10, 11
    views = SyntheticClips(cfg, 6, rank=1, world_size=2, prefetch=0, repeated_aug=2).batch(1)  # the same clips
    for key in ("video", "label", "motion"):
        assert torch.equal(views[key], plain[key].repeat_interleave(2, dim=0)), key
    with pytest.raises(ValueError, match="train.micro_batch_size=5: it counts views, data.repeated_aug=2 "):
        SyntheticClips(cfg, 5, repeated_aug=2)


def test_model_ema_keeps_an_fp32_average_of_a_bf16_model():
    torch.manual_seed(0)
    cfg = config_for("vit_tiny", depth=1, num_frames=4, img_size=(16, 16), patch_size=8)
    model = VideoClassifier(cfg, 3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ClassifierEma(model, decay=0.9999, autocast=torch.bfloat16)
    model.bfloat16()  # as the engine casts it under precision=bf16
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.25)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    for name, param in model.named_parameters():
        expected = param.float() + 0.9999**3 * (start[name] - param.float())
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)
        assert (state[name] - start[name]).abs().min() > 5e-5  # 1e-4 steps a bf16 average would round away
    logits = ema(torch.randn(2, 3, 4, 16, 16))
    assert logits.shape == (2, 3) and logits.dtype == torch.bfloat16  # evaluated under bf16 autocast


# -- evaluation -----------------------------------------------------------------------------------------------------
def test_multi_view_aggregation_equals_a_direct_per_view_computation():
    torch.manual_seed(0)
    cfg = config_for("vit_tiny", depth=1, num_frames=4, img_size=(16, 16), patch_size=8)
    model = VideoClassifier(cfg, 3).eval()
    video = torch.randn(3, 9, 16, 24)  # 9 frames, 16x24: 2 temporal x 3 spatial views of 4x16x16
    views = evaluate.clip_views(video, 4, (16, 16), 2, 3)
    assert views.shape == (6, 3, 4, 16, 16)
    with torch.no_grad():
        got = evaluate.average_views(model(views), 6)[0]
        direct = torch.zeros(3)
        for t0 in (0, 5):  # windows from the first to the last frame
            for x0 in (0, 4, 8):  # crops from the left to the right edge
                direct += model(video[None, :, t0 : t0 + 4, :, x0 : x0 + 16]).softmax(-1)[0] / 6
    torch.testing.assert_close(got, direct)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    metrics = evaluate.accuracy(probs, torch.tensor([0, 2, 2, 1]), 3)
    # top-1 hits: videos 0 and 2; mean per class: class 0 1/1, class 1 0/1, class 2 1/2.
    assert metrics == {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": pytest.approx(0.5), "videos": 4}


def test_uneven_video_counts_are_evaluated_exactly_once():
    count, world = 7, 3
    shares = [list(evaluate.shard_indices(count, r, world)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(count))
    # Padding repeats an index: gathering keeps it once.
    preds = [evaluate.Prediction(i, f"v{i}", i % 2, torch.tensor([0.5, 0.5])) for s in shares for i in s + s[-1:]]
    assert [p.index for p in evaluate.gather_predictions(preds)] == list(range(count))


# -- real runs ------------------------------------------------------------------------------------------------------
def test_finetune_from_an_encoder_export_trains_evaluates_and_resumes_exactly(pretrained, tmp_path):
    # Repeated augmentation (the default, 2 views per clip) and a model EMA at decay 0.5 (visible in 6 steps).
    init = [f"init={pretrained / 'encoder-adamae'}", "finetune.model_ema=true", "finetune.model_ema_decay=0.5"]
    straight = tmp_path / "straight"
    proc = run_finetune(*TINY_FT, *init, "train.steps=6", "train.ckpt_every=1", f"run_dir={straight}")
    assert "loaded 28 tensors, new 2 (fc_norm, head)" in proc.stdout and "top-1" in proc.stdout
    assert "global batch 4 views (2 clips x 2)" in proc.stdout and "EMA top-1" in proc.stdout
    result = json.loads((straight / "eval.json").read_text())
    assert result["videos"] == 7 and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert 0.0 <= result["ema_top1"] <= result["ema_top5"] <= 1.0 and "ema_mean_class_accuracy" in result
    assert result["temporal_views"] == 2 and result["spatial_views"] == 3
    rows = [json.loads(line) for line in (straight / "predictions.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in rows}) == 7 and all(len(r["top5"]) == 4 for r in rows)
    assert len((straight / "predictions_ema.jsonl").read_text().splitlines()) == 7

    # The EMA after every step is the average of the weights after every step, computed here.
    states = [checkpoint_state(straight, step) for step in range(1, 7)]
    start = load_file(pretrained / "encoder-adamae" / "model.safetensors")
    first = states[0]
    for name in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        expected = 0.5 * start[name] + 0.5 * first["module"][name]
        torch.testing.assert_close(first["ema"][name], expected, rtol=1e-6, atol=1e-9)
    for before, after in pairwise(states):
        assert after["ema"].keys() == after["module"].keys()
        for name, weights in after["module"].items():
            expected = 0.5 * before["ema"][name] + 0.5 * weights
            torch.testing.assert_close(after["ema"][name], expected, rtol=1e-6, atol=1e-9)
    last = states[-1]
    assert not torch.equal(last["ema"]["head.weight"], last["module"]["head.weight"])
    exported = load_file(straight / "model_ema" / "model.safetensors")
    assert all(torch.equal(exported[name], last["ema"][name]) for name in last["ema"])

    resumed = tmp_path / "resumed"
    run_finetune(*TINY_FT, *init, "train.steps=6", "train.ckpt_every=3", "train.stop_after=3", f"run_dir={resumed}")
    assert not (resumed / "eval.json").exists()
    run_finetune(*TINY_FT, *init, "train.steps=6", "train.ckpt_every=3", f"run_dir={resumed}")
    assert losses(resumed) == losses(straight)  # mixup/cutmix draws included
    assert json.loads((resumed / "eval.json").read_text()) == result  # the EMA's figures included
    again = load_file(resumed / "model_ema" / "model.safetensors")
    assert all(torch.equal(again[name], exported[name]) for name in exported)  # the EMA resumed exactly

    # The trained classifier's folder → transformers' VideoMAEForVideoClassification, logits within 1e-4.
    import transformers  # the test extra installs it

    from adamae_scale.convert import cli

    assert cli.main(["to-hf", str(straight / "model"), str(tmp_path / "hf")]) == 0
    hf_model, info = transformers.VideoMAEForVideoClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((straight / "model" / "config.json").read_text())
    ours = VideoClassifier(make_config(config["model"]), config["num_classes"]).eval()
    ours.load_state_dict(load_file(straight / "model" / "model.safetensors"))
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = ours(video)
        got = hf_model.eval()(pixel_values=video.permute(0, 2, 1, 3, 4)).logits
    assert expected.abs().max() > 1e-3 and (got - expected).abs().max().item() < 1e-4

    # eval_only on the finished run's checkpoint gives the same figures (the EMA's from the checkpoint).
    run_finetune(*TINY_FT, *init, "train.steps=6", "eval_only=true", f"run_dir={resumed}")
    assert json.loads((resumed / "eval.json").read_text()) == result


def test_two_rank_zero2_finetune_counts_every_video_once(pretrained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_FT if not o.startswith("ds=")]
    run_finetune(
        *overrides,
        f"init={pretrained / 'encoder-timm'}",
        "ds=zero2",
        "train.steps=4",
        "train.micro_batch_size=2",  # 1 clip x 2 views per rank
        "eval.every=2",
        "finetune.model_ema=true",  # every rank averages its full copy of the weights
        f"run_dir={run_dir}",
        nproc=2,
    )
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["videos"] == 7  # 7 videos on 2 ranks: 4 + 3, the padding counted once
    assert 0.0 <= result["ema_top1"] <= result["ema_top5"] <= 1.0
    keys = [json.loads(line)["key"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert keys == [f"synthetic-{i:06d}" for i in range(7)]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_top1" in r] == [2, 4]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_ema_top1" in r] == [2, 4]

    # The last ZeRO-2 checkpoint, consolidated, is the classifier the run wrote, bit for bit; with --ema, its EMA.
    for flag, written in (((), "model"), (("--ema",), "model_ema")):
        out = tmp_path / f"consolidated-{written}"
        code, stdout, stderr = convert_cli(capsys, "consolidate", run_dir, out, *flag)
        assert code == 0, stderr
        assert "classifier vit_tiny" in stdout and "from ZeRO-2 checkpoint step_00000004 (world size 2" in stdout
        assert_same_classifier(out, run_dir / written)
        config = json.loads((out / "config.json").read_text())
        assert config["source"]["model_ema"] is bool(flag) and config["source"]["zero_stage"] == 2


def assert_same_classifier(folder, reference):
    """``folder`` holds the classifier ``reference`` (a RUN_DIR/model) holds: config and weights, bit for bit."""
    config, expected = (json.loads((f / "config.json").read_text()) for f in (folder, reference))
    assert config["format"] == expected["format"] == "adamae-classifier"
    assert (config["model"], config["num_classes"]) == (expected["model"], expected["num_classes"])
    weights, reference_weights = (load_file(f / "model.safetensors") for f in (folder, reference))
    assert list(weights) == list(reference_weights)
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights), folder


def test_linear_probe_trains_only_the_head(pretrained, tmp_path, capsys):
    run_dir = tmp_path / "probe"
    proc = run_finetune(
        *[o for o in TINY_FT if not o.startswith("ds=")],
        "ds=zero1",  # the frozen encoder is kept outside ZeRO's partitions: consolidate must still find it
        f"init={pretrained / 'full'}",
        "finetune.mode=linear",
        "train.steps=3",
        "train.ckpt_every=3",
        f"run_dir={run_dir}",
    )
    assert "finetune (linear)" in proc.stdout and "0.00M trainable" in proc.stdout and (run_dir / "eval.json").is_file()
    from adamae_scale.base.weights import DEEPSPEED_GLOBALS, safe_torch_load

    saved = safe_torch_load(run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt", DEEPSPEED_GLOBALS)
    weights = saved["module"]
    full = load_file(pretrained / "full" / "model.safetensors")
    assert torch.equal(weights["blocks.0.mlp.fc1.weight"], full["encoder.blocks.0.mlp.fc1.weight"])  # frozen
    assert torch.equal(weights["fc_norm.weight"], torch.ones_like(weights["fc_norm.weight"]))  # frozen at identity
    assert weights["head.weight"].abs().max() > 0.001 * 0.05  # trained away from its tiny initial scale

    code, _, stderr = convert_cli(capsys, "consolidate", run_dir, tmp_path / "probe-model")
    assert code == 0, stderr
    assert_same_classifier(tmp_path / "probe-model", run_dir / "model")
    # A fine-tuned classifier is an init= source too (say, for another label set): encoder and fc_norm, a new head.
    source = load_source(str(tmp_path / "probe-model"))
    other_task = VideoClassifier(classifier_config(source, None, {}, 0.0), 7)
    state, report = classifier_state(source, {n: p.shape for n, p in other_task.named_parameters()})
    probe = load_file(run_dir / "model" / "model.safetensors")
    assert sorted(state) == sorted(n for n in probe if not n.startswith("head."))
    assert all(torch.equal(state[name], probe[name]) for name in state)
    assert report.new == ["head"] and sorted(report.dropped) == ["head.bias", "head.weight"]
    # --ema needs a run that kept one, and a fine-tuning checkpoint at all: one line each, nothing written.
    code, _, stderr = convert_cli(capsys, "consolidate", run_dir, tmp_path / "no-ema", "--ema")
    assert code == 2 and "holds no model EMA (the run had finetune.model_ema=false)" in one_line_error(stderr)
    code, _, stderr = convert_cli(capsys, "consolidate", pretrained / "run", tmp_path / "no-ema", "--ema")
    assert code == 2 and "is not a fine-tuning checkpoint" in one_line_error(stderr)
    code, _, stderr = convert_cli(capsys, "consolidate", run_dir, tmp_path / "no-ema", "--model", "vit_small")
    assert code == 2 and "is a fine-tuning checkpoint; its config.json names it" in one_line_error(stderr)
    assert not (tmp_path / "no-ema").exists()


def test_finetune_on_shards_tests_every_validation_video_in_views(tmp_path, monkeypatch, capsys):
    from adamae_scale.data.shards import ShardOptions, build_shards

    from .test_pipeline import all_keys, make_videos

    make_videos(tmp_path / "videos", 7)  # 3 classes (sub-folders)
    for store in ("mp4", "jpg"):  # training from mp4 shards, the test on JPEG shards
        opts = ShardOptions(store=store, short_side=32, min_frames=8, samples_per_shard=3)
        build_shards(tmp_path / "videos", tmp_path / store, opts, workers=1, progress=False)
    check_repeated_views(tmp_path / "mp4", monkeypatch)
    run_dir = tmp_path / "run"
    overrides = [
        *[o for o in TINY_FT if not o.startswith(("data.", "eval.videos"))],
        "model=vit_tiny",
        "model.depth=1",
        "model.num_frames=4",
        "model.img_size=[32,32]",
        "model.patch_size=8",
        "data=shards",
        f"data.urls={tmp_path / 'mp4'}",
        "data.sampling_rate=2",
        "data.workers=1",
        "train.steps=2",
        "eval.temporal_views=2",
        "eval.spatial_views=2",
    ]
    with pytest.raises(ValueError, match=r"^data.val_urls: not set; with data=shards every evaluation"):
        validate(schema.compose(overrides, config_name="finetune"))
    overrides.append(f"data.val_urls={tmp_path / 'jpg'}")
    check_single_view_batches(validate(schema.compose(overrides, config_name="finetune")), tmp_path / "jpg")
    proc = run_finetune(*overrides, "eval.every=1", f"run_dir={run_dir}")
    assert "3 classes" in proc.stdout  # from the shards' label map
    assert len([r for r in read_metrics(run_dir / "metrics.jsonl") if "val_top1" in r]) == 2
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["videos"] == 7 and result["skipped"] == 0
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {r["key"] for r in rows} == all_keys(tmp_path / "jpg")
    manifest = json.loads((tmp_path / "jpg" / "manifest.json").read_text())
    assert sorted(r["label"] for r in rows) == sorted(i % 3 for i in range(7)), manifest["label_map"]

    # Class names from the shards' label map: predictions (name, index, source video), eval.json, the picture,
    # the classifier folder and the transformers export.
    names = ["class0", "class1", "class2"]
    assert manifest["label_map"] == {name: i for i, name in enumerate(names)}
    for row in rows:
        assert row["label_name"] == names[row["label"]] and row["predicted_name"] == names[row["predicted"]]
        assert Path(row["source"]).parent.name == row["label_name"]  # the film's class folder
        assert row["top5_names"] == [names[i] for i in row["top5"]]
    assert sorted(Path(r["source"]).name for r in rows) == [f"v{i:02d}.mp4" for i in range(7)]
    assert [(c["name"], c["videos"]) for c in result["per_class"]] == [("class0", 3), ("class1", 2), ("class2", 2)]
    counts = result["confusion_matrix"]["counts"]
    assert result["confusion_matrix"]["class_names"] == names and [sum(r) for r in counts] == [3, 2, 2]
    assert sum(counts[i][i] for i in range(3)) == round(result["top1"] * 7)
    from PIL import Image

    assert Image.open(run_dir / "confusion_matrix.png").size[0] > 100
    assert json.loads((run_dir / "model" / "config.json").read_text())["class_names"] == names
    code, stdout, stderr = convert_cli(capsys, "to-hf", run_dir / "model", tmp_path / "hf")
    assert code == 0 and stdout.rstrip().endswith("transformers VideoMAEForVideoClassification"), stderr
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["id2label"] == {"0": "class0", "1": "class1", "2": "class2"} and hf["label2id"]["class2"] == 2


def check_single_view_batches(checked, val_urls):
    """``eval.every`` on shards scores the centre clip of every validation video (7 here, fewer than
    eval.batches × eval.micro_batch_size), not batches of the augmented training stream."""
    from adamae_scale.engine.setup import DistEnv
    from adamae_scale.finetune.shard_views import rank_videos
    from adamae_scale.finetune.views import single_view_batches

    cfg, _, model_cfg, _ = checked
    batches = single_view_batches(cfg, model_cfg, DistEnv(rank=0, world_size=1, local_rank=0))
    centre = list(rank_videos(str(val_urls), 0, 1, 4, (32, 32), 2, 1, 1, []))
    assert [len(b["label"]) for b in batches] == [6, 1]
    assert torch.equal(torch.cat([b["video"] for b in batches]), torch.cat([v.views for v in centre]))
    assert torch.cat([b["label"] for b in batches]).tolist() == [v.label for v in centre]


def check_repeated_views(urls, monkeypatch):
    """Repeated augmentation on real shards: 3 views of every clip, consecutive, with its label and key; each
    view cropped and RandAugment-ed on its own; the window decoded once; and the stream resumes exactly."""
    from adamae_scale.data.pipeline import ShardClips, ShardDataConfig
    from adamae_scale.data.video import VideoReader

    decodes = []
    read_indices = VideoReader.read_indices

    def counted(self, *args, **kwargs):
        decodes.append(1)
        return read_indices(self, *args, **kwargs)

    monkeypatch.setattr(VideoReader, "read_indices", counted)
    cfg = ShardDataConfig(
        urls=str(urls),
        num_frames=4,
        img_size=(32, 32),
        sampling_rate=2,
        workers=0,
        rand_augment="rand-m7-n4-mstd0.5-inc1",
        repeated_aug=3,
    )
    stream = ShardClips(cfg, batch_size=6)  # 2 clips x 3 views
    first = next(stream)
    assert len(decodes) == 2 and first["video"].shape == (6, 3, 4, 32, 32)
    for clip in range(2):
        views = slice(3 * clip, 3 * clip + 3)
        assert len(set(first["key"][views])) == 1 and len(set(first["label"][views].tolist())) == 1
        video = first["video"][views]
        assert all(not torch.equal(video[a], video[b]) for a, b in ((0, 1), (0, 2), (1, 2)))  # distinct views
    assert first["key"][0] != first["key"][3]

    state = stream.state_dict()
    assert state["repeated_aug"] == 3
    expected = [next(stream) for _ in range(3)]  # the last takes clip 7 of 7 and the next epoch's first
    assert len(decodes) == 9 and expected[-1]["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    resumed = ShardClips(cfg, batch_size=6)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"] and torch.equal(got["video"], want["video"])
    with pytest.raises(ValueError, match="train.micro_batch_size=4: it counts views, data.repeated_aug=3 "):
        ShardClips(cfg, batch_size=4)
