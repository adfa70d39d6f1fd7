"""The embedded synthetic clips: deterministic, resumable, with correct motion ground truth."""

import threading
from dataclasses import replace

import torch

from adamae_scale.base.pixels import denormalize
from adamae_scale.data import build_data
from adamae_scale.data.synthetic import SyntheticClips, SyntheticConfig, render_clip, render_threads, token_coverage
from adamae_scale.metrics import focus_ratio
from adamae_scale.models import make_config

CFG = SyntheticConfig(num_frames=8, img_size=(48, 64), patch_size=8, tubelet_size=2, seed=3)


def test_clips_are_a_pure_function_of_seed_and_index():
    a_video, a_motion = render_clip(CFG, 5)
    b_video, b_motion = render_clip(CFG, 5)
    assert torch.equal(a_video, b_video) and torch.equal(a_motion, b_motion)
    assert not torch.equal(a_video, render_clip(CFG, 6)[0])
    assert a_video.shape == (3, 8, 48, 64) and a_motion.shape == (4 * 6 * 8,)
    assert 0.0 <= a_video.min() and a_video.max() <= 1.0


def test_motion_tokens_are_the_tokens_covered_by_moving_objects():
    """Ground truth re-derived independently: the same clip rendered without objects is the static
    background; pixels that differ from it belong to objects."""
    background_only = replace(CFG, num_objects=(0, 0))
    for index in range(6):
        video, motion = render_clip(CFG, index)
        background, none = render_clip(background_only, index)
        assert not none.any()
        assert torch.equal(background[:, :1].expand_as(background), background)  # static
        object_pixels = (video != background).any(dim=0)  # (T, H, W)
        assert not torch.equal(object_pixels[0], object_pixels[-1])  # the objects move
        expected = token_coverage(object_pixels, CFG.tubelet_size, CFG.patch_size) >= CFG.motion_threshold
        assert torch.equal(motion, expected)
        assert 0.02 < motion.float().mean() < 0.5


def test_batches_split_ranks_and_resume_exactly():
    one = SyntheticClips(CFG, batch_size=4)
    batches = [next(one) for _ in range(3)]
    rank0, rank1 = SyntheticClips(CFG, 2, rank=0, world_size=2), SyntheticClips(CFG, 2, rank=1, world_size=2)
    for batch in batches:
        halves = [next(rank0), next(rank1)]
        assert torch.equal(torch.cat([h["video"] for h in halves]), batch["video"])
    resumed = SyntheticClips(CFG, batch_size=4)
    next(resumed)  # prefetches ahead; the state still counts consumed batches
    state = {"next_batch": 2}
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["video"], batches[2]["video"])
    assert one.state_dict() == {"next_batch": 3}
    pixels = denormalize(batches[0]["video"])
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_parallel_rendering_gives_the_same_batches():
    serial, parallel = SyntheticClips(CFG, batch_size=4), SyntheticClips(CFG, batch_size=4, threads=3)
    for _ in range(2):
        a, b = next(serial), next(parallel)
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["motion"], b["motion"])
    assert render_threads(5, local_world_size=8, accelerated=False) == 5
    assert render_threads(0, local_world_size=1, accelerated=False) == 1
    assert 1 <= render_threads(0, local_world_size=1, accelerated=True) <= 8
    assert render_threads(0, local_world_size=10_000, accelerated=True) == 1


def test_close_joins_the_rendering_threads_and_the_stream_goes_on():
    before = set(threading.enumerate())
    clips = SyntheticClips(CFG, batch_size=4, threads=2)
    next(clips)  # the prefetch thread is now rendering batches 1 and 2
    assert any(t.name.startswith("synthetic") for t in set(threading.enumerate()) - before)
    clips.close()
    assert not any(t.name.startswith("synthetic") for t in set(threading.enumerate()) - before)
    again = SyntheticClips(CFG, batch_size=4)
    next(again)
    assert torch.equal(next(clips)["video"], next(again)["video"])  # batch 1, rendered in the caller's thread


def test_focus_ratio_definition():
    motion = torch.zeros(2, 10, dtype=torch.bool)
    motion[:, :2] = True  # 20% of tokens move
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, [0, 5]] = False  # half of the visible tokens are motion tokens
    assert abs(focus_ratio(mask, motion) - 2.5) < 1e-6
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, [5, 6]] = False
    assert focus_ratio(mask, motion) == 0.0


def test_training_stream_renders_in_turn_on_the_cpu():
    # On the CPU a rendering-ahead thread takes cores from torch's own threads: build_data renders each batch
    # when it is asked for (same batches, no thread).
    model_cfg = make_config({"name": "vit_tiny", "num_frames": 4, "img_size": [32, 32], "patch_size": 8})
    before = set(threading.enumerate())
    stream = build_data({"name": "synthetic", "num_objects": [1, 2]}, model_cfg, 2, 0, 1)
    first = next(stream)
    assert stream.prefetch == (2 if torch.cuda.is_available() else 0)
    if not torch.cuda.is_available():
        assert not any(t.name.startswith("synthetic") for t in set(threading.enumerate()) - before)
    ahead = SyntheticClips(replace(stream.cfg), batch_size=2)
    assert torch.equal(first["video"], next(ahead)["video"])
    ahead.close()
