"""``adamae-bench``: benchmarks that print one JSON object each. Subcommands:

- ``step`` (``step.py``): seconds per optimizer step of the real engine on a fixed batch, against the limits
  measured in the same run: the same step in plain torch, the matmul peak (MFU), where the step goes, and
  optionally random masking.
- ``memory`` (``memory.py``): per-rank memory implied by a ZeRO stage, and measured from real pre-training steps.
- ``scale`` (``scale.py``): ``adamae-shards`` videos per second with the process pool, Ray and SLURM-style parts
  at equal workers on a Kinetics-shaped set it makes; loader clips per second from local shards vs S3.
- ``parity`` (``parity.py``): ``make demo`` per option and seed (decoder masking, cheaper samplers, the
  ``fast`` preset): held-out focus and final loss against the default's seed band.
- ``data`` (``data.py``): training clips per second per DataLoader worker from tar shards (each storage format
  present) against decoding a random window straight from the original video files; and their ratio.

Add a benchmark as another module and a ``register_*`` function here that adds its parser and sets ``func``
to a callable taking the parsed arguments and returning a JSON-able dict (``None`` on ranks that do not
report). The benchmark modules are imported when their subcommand runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .settings import split_settings


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from . import data

    return data.run(args)


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    from . import memory

    return memory.run(*split_settings("memory", args.settings, memory.DEFAULTS))


def bench_step(args: argparse.Namespace) -> dict[str, Any] | None:
    from . import step

    return step.run(*split_settings("step", args.settings, step.DEFAULTS))


def bench_parity(args: argparse.Namespace) -> dict[str, Any]:
    from . import parity

    return parity.run(*split_settings("parity", args.settings, parity.DEFAULTS))


def register_parity(sub: argparse._SubParsersAction) -> None:
    _register_settings_benchmark(
        sub,
        "parity",
        bench_parity,
        help="make demo per option and seed: held-out focus and final loss against the default's seed band",
        description="Runs adamae-pretrain +experiment=demo once per option and seed (seed=S data.seed=S), one after "
        "another, and prints per option the seeds' focus_ratio (sampled masks), focus_ratio_topk, final loss_rec "
        "and seconds, with mean and range, and whether the option's mean focus lies below, within or above the "
        "default's range over the seeds. Settings: variants=default,decoder_cell,decoder_random,sampler_half,"
        "sampler_pool,sampler_kv_pool,sampler_bf16,fast,fast_pool,fast_full_attention seeds=N parallel=N (runs at a "
        "time); any other key=value is added to every run (train.steps=300 ...).",
    )


def register_data(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="clips/s per worker from shards vs decoding windows from the original videos",
        description="Training clips (multi-scale crop, resize, normalise) per second per DataLoader worker, from "
        "tar shards (each storage format found) and, as the baseline, from random windows decoded "
        "straight from the original video files.",
    )
    parser.add_argument(
        "--urls",
        action="append",
        required=True,
        help="shards (folder, manifest.json, brace pattern); repeat for several sets",
    )
    parser.add_argument("--videos", required=True, help="folder of the original video files (recursive)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (0: in-process)")
    parser.add_argument("--clips", type=int, default=64, help="clips timed per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing starts")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per batch")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--img-size", type=int, default=224, help="clip height and width")
    parser.add_argument("--sampling-rate", type=int, default=4, help="frames between sampled frames")
    parser.add_argument("--shuffle-buffer", type=int, default=16, help="shard pipeline shuffle buffer")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="also measure each path in-process against CPU time (cpu_* fields): steady on a "
        "machine shared with other work",
    )
    parser.set_defaults(func=bench_data)


def _register_settings_benchmark(
    sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], Any], help: str, description: str
) -> None:
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("settings", nargs="*", help="key=value settings (see above)")
    parser.set_defaults(func=func)


def register_memory(sub: argparse._SubParsersAction) -> None:
    _register_settings_benchmark(
        sub,
        "memory",
        bench_memory,
        help="per-rank memory of a model under a ZeRO stage (model and, with run=true, measured)",
        description="Prints params and bytes_per_rank (params, grads, optimizer, total) implied by the ZeRO stage "
        "and precision; with run=true also measured_peak_bytes_per_rank from real pre-training steps "
        "(micro-batch 1, launched with torchrun for world_size > 1). Settings: model=NAME "
        "engine=deepspeed|fairscale ds=NAME (DeepSpeed) sharding=oss|oss_sdp|fsdp (fairscale) "
        "world_size=N run=true|false steps=K; any other key=value is passed to adamae-pretrain "
        "(e.g. precision=bf16 model.checkpoint_every=1).",
    )


def register_step(sub: argparse._SubParsersAction) -> None:
    _register_settings_benchmark(
        sub,
        "step",
        bench_step,
        help="training steps per second of the real engine on a fixed batch, against plain torch and the matmul peak",
        description="Times optimizer steps (forward, losses, backward, ZeRO communication, AdamW) on one fixed "
        "synthetic batch on the device, after warm-up. Prints seconds_per_step, clips_per_s, the FLOPs a step "
        "executes (torch's FlopCounterMode, attention counted on every device, recomputation included), the "
        "achieved TFLOP/s and peak memory per rank; then, measured in the same run: "
        "baseline_seconds_per_step (the same model, loss, AdamW, batch and precision stepped in plain torch) "
        "and engine_overhead, peak_tflops (a matmul peak in the step's dtype) and mfu, a breakdown of the step "
        "(sampler, encoder, decoder, loss, backward, optimizer, other), and with compare_random=true the same "
        "step under masking=random and adaptive_over_random. Settings: steps=K warmup=K baseline=true|false "
        "breakdown=true|false compare_random=true|false; any other key=value is an adamae-pretrain override "
        "(model=vit_large ds=zero1 precision=bf16 train.micro_batch_size=16 model.checkpoint_every=1 ...). "
        "Launch with torchrun for several ranks; rank 0 prints.",
    )


def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    from . import scale

    return scale.run(args)


def register_scale(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "scale",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="adamae-shards videos/s: process pool vs Ray vs SLURM-style parts; loader clips/s: local vs S3",
        description="(1) adamae-shards videos per second on a Kinetics-shaped set made by the benchmark (640x360, "
        "30 fps, 10 s H.264 with B-frames) at the same number of workers: the process pool, Ray tasks on a local "
        "Ray cluster (its start-up reported apart) and the job split into parts run at the same time plus merge. "
        "(2) Training clips per second of the shard loader from the local shards and from the same shards in an "
        "S3-protocol server (--s3-endpoint, or a moto_server started on 127.0.0.1), after a warm-up.",
    )
    parser.add_argument("--videos", type=int, default=16, help="Kinetics-shaped videos to make and convert")
    parser.add_argument("--workers", type=int, default=2, help="processes / Ray CPUs / parts, the same for each")
    parser.add_argument("--videos-per-shard", type=int, default=2, help="videos per shard")
    parser.add_argument("--short-side", type=int, default=256, help="adamae-shards --short-side")
    parser.add_argument("--clips", type=int, default=64, help="clips timed per loader measurement")
    parser.add_argument("--warmup", type=int, default=4, help="batches before the loader's timing starts")
    parser.add_argument(
        "--s3-endpoint", default=None, help="an S3 endpoint to use (credentials from the environment); default: moto"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of every measurement, interleaved; the best of each is reported"
    )
    parser.add_argument("--work-dir", default=None, help="where the videos and shards go (default: the temp dir)")
    parser.set_defaults(func=bench_scale)


REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = [
    register_data,
    register_memory,
    register_step,
    register_scale,
    register_parity,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamae-bench", description="Benchmarks; each prints one JSON object.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for register in REGISTRY:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"adamae-bench: error: {err}", file=sys.stderr)
        return 2
    if result is not None:  # multi-rank benchmarks report from rank 0 only
        print(json.dumps(result))
    return 0
