"""``adamae-visualize``: what a pre-trained model's sampler looks at, and what its decoder makes of the rest.

For every clip it writes ``NAME.png`` (one column per frame; rows in ``adamae_scale.visual.panel``), ``NAME.gif``
(the same rows over time) and ``NAME.json`` (the visible tokens and the focus figures of
``adamae_scale.visual.focus``), and prints one line of focus figures. Every user error is one line on stderr,
``adamae-visualize: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..convert.cli import positive_int
from ..convert.consolidate import consolidate, locate_checkpoint, read_run_config
from ..convert.errors import ConvertError
from ..convert.folder import CONFIG_FILE, MODEL_FILE, load_model
from ..data.eval_clips import shard_clips, video_clip
from ..data.video import VideoError
from ..losses import TARGETS
from ..models import AdaMAE
from .focus import clip_focus, describe
from .panel import MASK_MODES, Panel, compute_panel

PROG = "adamae-visualize"
GIF_FRAME_MS = 200


class VisualizeError(Exception):
    """A wrong path, an unreadable video or a bad option: shown as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise VisualizeError(f"{message} (see '{self.prog} --help')")


def load_source(src: str | Path) -> tuple[AdaMAE, str | None]:
    """The model of a weight folder (``adamae-convert consolidate``/``import``: loaded as is) or of a DeepSpeed
    checkpoint (a run folder, its ``checkpoints/`` or a ``step_N`` tag: consolidated into a temporary folder
    first, with the same verification and safe loading as ``adamae-convert consolidate``), and the run's
    ``loss.target`` when the folder records it."""
    path = Path(src)
    if not path.exists():
        raise VisualizeError(f"SRC {src}: no such folder")
    if (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return load_model(path), _loss_target(path)
    try:
        location = locate_checkpoint(path)
    except ConvertError:
        raise VisualizeError(
            f"SRC {src} is neither a weight folder ({MODEL_FILE} + {CONFIG_FILE}, from 'adamae-convert consolidate' "
            "or 'import') nor a DeepSpeed checkpoint (RUN_DIR, RUN_DIR/checkpoints or a step_N folder)"
        ) from None
    if (read_run_config(location) or {}).get("task") == "classification":
        raise VisualizeError(
            f"SRC {src} is a fine-tuning checkpoint: a classifier has no token sampler or decoder to draw; "
            "pass a pre-training run"
        )
    with tempfile.TemporaryDirectory(prefix="adamae-visualize-") as tmp:
        consolidate(location.root, Path(tmp) / "model", tag=location.tag)
        return load_model(Path(tmp) / "model"), _loss_target(Path(tmp) / "model")


def _loss_target(folder: Path) -> str | None:
    target = json.loads((folder / CONFIG_FILE).read_text()).get("loss_target")
    return target if target in TARGETS else None


def _clips(args: argparse.Namespace, model: AdaMAE) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, source, clip)`` of every clip, read before any is drawn: a bad input fails the command before
    it writes anything."""
    cfg = model.cfg
    if args.video:
        clips = []
        for video in args.video:
            try:
                clip = video_clip(video, cfg.num_frames, cfg.img_size, args.sampling_rate)
            except VideoError as err:
                raise VisualizeError(f"--video {video}: {err}") from None
            clips.append((Path(video).stem, str(video), clip))
        return clips
    try:
        stream: Iterator[tuple[str, torch.Tensor]] = shard_clips(
            args.shards, cfg.num_frames, cfg.img_size, args.sampling_rate
        )
        clips = [(key, f"{args.shards} {key}", clip) for key, clip in islice(stream, args.num)]
    except ValueError as err:
        raise VisualizeError(f"--shards {args.shards}: {err}") from None
    if not clips:
        raise VisualizeError(f"--shards {args.shards}: no readable sample")
    return clips


def _unique(name: str, taken: set[str]) -> str:
    name = name.replace("/", "_") or "clip"
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique


def write_outputs(out_dir: Path, name: str, panel: Panel, record: dict[str, Any]) -> None:
    """``NAME.png``, ``NAME.gif`` and ``NAME.json`` in ``out_dir``."""
    Image.fromarray(panel.image()).save(out_dir / f"{name}.png")
    first, *rest = [Image.fromarray(frame) for frame in panel.animation()]
    # Pillow merges identical consecutive frames (a still clip gives fewer GIF frames than columns).
    first.save(out_dir / f"{name}.gif", save_all=True, append_images=rest, duration=GIF_FRAME_MS, loop=0)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, recorded_target = load_source(args.src)
    target = args.target or recorded_target or "norm_pix"
    cfg = model.cfg
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    clips = _clips(args, model)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VisualizeError(f"--out {out_dir}: cannot create the folder ({err.strerror})") from None
    mode = args.mask if cfg.masking == "adaptive" else "sampled"  # random/tube models have no top-k
    taken: set[str] = set()
    records = []
    for index, (stem, source, clip) in enumerate(clips):
        name = _unique(stem, taken)
        panel = compute_panel(model, cfg, clip, mode, args.seed, index, target, device)
        focus = clip_focus(panel.frames, panel.mask, panel.probs, cfg.tubelet_size, cfg.patch_size)
        record = {
            "source": source,
            "model": cfg.name,
            "masking": cfg.masking,
            "mask": mode,
            "seed": args.seed,
            "sampling_rate": args.sampling_rate,
            "target": target,
            "rows": panel.row_names,
            "num_tokens": cfg.num_tokens,
            "visible_tokens": np.flatnonzero(~panel.mask).tolist(),
            "reconstruction_error": float(panel.error[panel.mask].mean()),
            "heat_scale": {  # the value shown at the top of each heat map's colour ramp
                "probability": None if panel.probs is None else float(panel.probs.max()),
                "error": float(panel.error.max()),
            },
            "focus": focus,
        }
        write_outputs(out_dir, name, panel, record)
        print(describe(name, focus), flush=True)
        records.append(record)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Draw what a pre-trained AdaMAE does with clips: the input, the sampler's probability map, "
        "the visible tokens, the reconstruction and the per-token error, one column per frame (NAME.png, "
        "NAME.gif), and how much of the sampler's attention goes to the clip's most moving tokens (NAME.json).",
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        help="a weight folder (adamae-convert consolidate/import) or a run's DeepSpeed checkpoint (RUN_DIR, "
        "RUN_DIR/checkpoints or a step_N folder)",
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--video", action="append", metavar="FILE", help="a video file (repeat for several)")
    inputs.add_argument("--shards", metavar="URL", help="adamae-shards output (as data.urls): the first --num clips")
    parser.add_argument("--num", type=positive_int, default=4, help="clips to take from --shards (default 4)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced)")
    parser.add_argument(
        "--mask",
        choices=MASK_MODES,
        default="topk",
        help="topk: the k most probable tokens (default); sampled: a Gumbel-top-k draw as in training, from "
        "--seed. Random/tube models always sample",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise of sampled masks (clip i uses sample i)")
    parser.add_argument("--sampling-rate", type=positive_int, default=4, help="frames between clip frames (4)")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        help="the run's loss.target (default: what the checkpoint records, else norm_pix)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (VisualizeError, ConvertError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
