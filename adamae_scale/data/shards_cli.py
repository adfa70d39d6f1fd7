"""``adamae-shards``: the command line over ``shards`` (one machine's process pool) and ``distribute`` (Ray tasks,
SLURM-array parts and their merge). Kept apart from both so that neither imports the other's caller."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import storage
from .annotations import FORMATS, AnnotationError
from .distribute import IncompleteJob, MergeError, build_distributed, merge_parts, part_from_environment
from .distribute import part_name as manifest_name
from .shards import MANIFEST, STORES, X264_PRESETS, ShardOptions, build_shards, parse_size


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (None and False say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamae-shards",
        description="Turn a folder of videos or an annotation file into WebDataset tar shards "
        "(PREFIX-000000.tar, ...) plus manifest.json, for `adamae-pretrain data=shards`. "
        "A sample is KEY.json (label, source path, fps, frame count, duration, size) plus KEY.mp4 or "
        "KEY.mjpeg. manifest.json lists each shard (samples, bytes, sha256), the label map, the options, "
        "the tool version and every skipped video with the reason. Shards are written under a temporary "
        "name and renamed when complete.",
        epilog="example: adamae-shards k400/train.csv shards/k400 --root k400/videos --workers 16",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        type=location,
        help="a folder of videos (searched recursively; sub-folder names become labels) or an "
        "annotation file: 'path label' list, CSV 'path,label', Kinetics CSV or SSv2 JSON; "
        "a local path or a URL (s3://, gs://; an annotation file also http(s)://)",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=location,
        help="where the shards and manifest.json go: a local folder or s3:// / gs:// (credentials from the "
        "usual environment variables and config files, AWS_ENDPOINT_URL for other S3 services)",
    )
    src = parser.add_argument_group("input")
    src.add_argument(
        "--root",
        type=location,
        default=None,
        help="folder that relative paths in the annotation file start from (default: the annotation file's folder)",
    )
    src.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="auto",
        help="annotation format; auto: .json is SSv2, .csv with a youtube_id column is Kinetics, "
        "other .csv is 'path,label', anything else is a space-separated list",
    )
    src.add_argument(
        "--label-map",
        type=Path,
        default=None,
        help="JSON file {label name: index} to number named labels (default: sorted names)",
    )
    video = parser.add_argument_group("preprocessing")
    video.add_argument(
        "--short-side",
        type=int,
        default=256,
        help="resize so the short side is this many pixels, keeping the aspect of the picture as a player shows "
        "it (upright, square pixels) (0: keep the size)",
    )
    video.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: keep)")
    video.add_argument(
        "--max-duration", type=float, default=None, help="keep at most this many seconds from the start of each video"
    )
    video.add_argument(
        "--clip-duration",
        type=float,
        default=None,
        help="split each video into consecutive clips of this many seconds (one sample each; "
        "a tail shorter than --min-frames is dropped; a video with no clip that long is reported as skipped)",
    )
    video.add_argument(
        "--min-frames",
        type=int,
        default=16,
        help="videos with fewer frames (after --fps/--max-duration) are reported as too short",
    )
    store = parser.add_argument_group("storage")
    store.add_argument(
        "--store",
        choices=STORES,
        default="mp4",
        help="per sample: mp4 = the clip re-encoded as H.264; jpg = every frame as a JPEG, "
        "back to back in one .mjpeg member (about 10x larger, decodes faster)",
    )
    store.add_argument("--crf", type=int, default=23, help="H.264 quality 0-51 (lower = better, larger)")
    store.add_argument("--preset", default="veryfast", help=f"x264 speed preset: {', '.join(X264_PRESETS)}")
    store.add_argument(
        "--gop",
        type=int,
        default=16,
        help="H.264 key-frame interval in frames: smaller = faster random windows, larger files",
    )
    store.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 for --store jpg (above 95 mostly adds bytes)"
    )
    out = parser.add_argument_group("shards")
    out.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="close a shard once it holds this many samples (0: no sample limit)",
    )
    out.add_argument(
        "--bytes-per-shard",
        type=parse_size,
        default=None,
        help="close a shard once it reaches this size, e.g. 1GB (with --samples-per-shard, whichever comes first)",
    )
    out.add_argument("--prefix", default="shard", help="shard names are PREFIX-000000.tar, ...")
    out.add_argument("--seed", type=int, default=0, help="seed of the shuffle of videos across shards")
    out.add_argument("--no-shuffle", action="store_true", help="keep the input order instead of shuffling")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding/encoding processes")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the job in OUT_DIR: keep shards that match manifest.json (size and sha256), "
        "re-make the others, process the remaining videos",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = parser.add_argument_group(
        "many machines",
        "every shard gets a fixed set of --samples-per-shard videos; the samples are those the "
        "process pool makes. OUT_DIR must be reachable from every machine (shared file system or object storage)",
    )
    scale.add_argument(
        "--distributor",
        choices=("pool", "ray"),
        default="pool",
        help="pool: --workers processes on this machine; ray: one Ray task per shard on a Ray cluster "
        "(a dead worker's task is retried), the driver writes manifest.json",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to use, e.g. 'auto' on a node of a cluster made with `ray start` "
        "(default: a new local one with --workers CPUs)",
    )
    scale.add_argument(
        "--part",
        default=None,
        help="I/N: make part I (0 <= I < N) of the shards, those whose index is I mod N, into OUT_DIR, and keep its "
        "progress in OUT_DIR/parts/; inside a SLURM array job SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT give it. "
        "When all parts are done, `adamae-shards merge OUT_DIR` writes manifest.json",
    )
    return parser


def location(text: str) -> Path | str:
    """A command-line path: a URL stays as it is, anything else is a local ``Path``."""
    return text if storage.is_url(text) else Path(text)


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamae-shards merge",
        description="Check that every part (--part I/N) of a shard job finished and every shard is in OUT_DIR, "
        "then write OUT_DIR/manifest.json for training.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=location, help="the OUT_DIR the parts wrote into")
    parser.add_argument("--verify", action="store_true", help="check every shard's sha256 too (reads every shard)")
    return parser


def nothing_stored(manifest: dict[str, Any], where: str, prog: str, part: str = "") -> bool:
    """True, after saying so in one line, when every video of the job (or of its ``part``) was skipped."""
    if manifest["num_samples"] or not manifest["failures"]:
        return False
    first = manifest["failures"][0]
    print(
        f"{prog}: error: {part}every video was skipped, e.g. {first['path']}: {first['reason']} "
        f"(all reasons in {where})",
        file=sys.stderr,
    )
    return True


def merge_main(argv: list[str]) -> int:
    args = build_merge_parser().parse_args(argv)
    try:
        manifest = merge_parts(args.out_dir, verify=args.verify)
    except (MergeError, storage.StorageError, FileNotFoundError, ValueError) as err:
        print(f"adamae-shards merge: error: {storage.redact(str(err))}", file=sys.stderr)
        return 1
    where = storage.join(storage.redact(str(args.out_dir)), MANIFEST)
    return 1 if nothing_stored(manifest, where, "adamae-shards merge") else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)

    part = None
    try:
        opts = ShardOptions(
            store=args.store,
            short_side=args.short_side,
            fps=args.fps,
            max_duration=args.max_duration,
            clip_duration=args.clip_duration,
            min_frames=args.min_frames,
            crf=args.crf,
            preset=args.preset,
            gop=args.gop,
            jpeg_quality=args.jpeg_quality,
            samples_per_shard=args.samples_per_shard or None,
            bytes_per_shard=args.bytes_per_shard,
            prefix=args.prefix,
            seed=args.seed,
            shuffle=not args.no_shuffle,
        )
        label_map = None
        if args.label_map is not None:
            try:
                label_map = {str(k): int(v) for k, v in json.loads(args.label_map.read_text()).items()}
            except (OSError, ValueError, AttributeError) as err:
                raise ValueError(
                    f"--label-map {args.label_map}: expected a JSON object {{name: index}} ({err})"
                ) from None
        part = part_from_environment(args.part) if args.part is not None or args.distributor == "pool" else None
        common = dict(
            root=args.root,
            fmt=args.fmt,
            label_map=label_map,
            workers=max(1, args.workers),
            resume=args.resume,
            progress=not args.no_progress,
        )
        if args.distributor == "pool" and part is None:
            manifest = build_shards(args.src, args.out_dir, opts, **common)
        else:
            manifest = build_distributed(
                args.src,
                args.out_dir,
                opts,
                distributor=args.distributor,
                ray_address=args.ray_address,
                part=part,
                **common,
            )
    except (AnnotationError, FileNotFoundError, FileExistsError, ValueError, storage.StorageError) as err:
        print(f"adamae-shards: error: {storage.redact(str(err))}", file=sys.stderr)
        return 2
    except IncompleteJob as err:
        print(f"adamae-shards: error: {err}", file=sys.stderr)
        return 1
    out = storage.redact(str(args.out_dir))
    done = f"part {part[0]}/{part[1]}: " if part is not None else ""
    where = storage.join(out, MANIFEST if part is None else manifest_name(*part))
    print(
        f"adamae-shards: {done}{manifest['num_samples']} samples in {len(manifest['shards'])} shards in {out}"
        f" ({manifest['num_failures']} videos skipped, reasons in {where})",
        file=sys.stderr,
    )
    # A part whose every video failed fails its array task too (often a node that cannot read or decode): its
    # manifest is written all the same, so the merge still goes through once the rest is fine.
    if nothing_stored(manifest, where, "adamae-shards", done):
        return 1
    if part is not None:
        print(f"adamae-shards: when every part is done: adamae-shards merge {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
