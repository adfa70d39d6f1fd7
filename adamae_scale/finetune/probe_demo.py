"""``make demo-probe``: does the frozen-encoder probe tell a pre-trained encoder from an untrained one, and how do
AdaMAE, random masking and tube masking compare, at small scale?

For each seed: the same small model pre-trained for the same steps on the same synthetic clips three times
(``masking=adaptive|random|tube``), and a fourth encoder of the same shape left at its random initialisation;
each frozen encoder probed the same way on the synthetic motion task (4 classes that only motion tells apart):
its features cached once, a sweep of probe learning rates trained on them together, the best on the held-out
videos reported (``finetune.lr_sweep``). The table gives each arm's top-1 per seed, mean and spread (sample
standard deviation over the seeds), and the demo ends by saying whether every pre-trained arm separated from no
pre-training by more than the noise: its worst seed above the untrained arm's best, and the gap of the means
over three times the larger spread.

Pre-training runs the real command line (``adamae-pretrain``, then ``adamae-convert consolidate``), two runs at a
time on one thread each; the probes run ``adamae-finetune``'s sweep in this process. ``--steps``, ``--seeds``,
``--probe`` change the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..data.synthetic import MOTION_CLASSES

ARMS = ("adaptive", "random", "tube", "none")
ARM_NAMES = {"adaptive": "AdaMAE", "random": "random masking", "tube": "tube masking", "none": "no pre-training"}
# The clip and the task: 8-frame 32x32 clips (64 tokens), objects fast enough to cross patches within a clip.
CLIP = ["model.num_frames=8", "model.img_size=[32,32]"]
TASK = ["data.speed=[0.03,0.12]"]
MODEL = ["model=vit_tiny", "model.patch_size=8", "model.depth=4"]  # the demo experiment's encoder


def _run(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"demo-probe: {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def pretrain(masking: str, seed: int, steps: int, out: Path) -> Path:
    """Pre-train one arm and consolidate it; returns the weight folder."""
    run_dir, weights = out / f"pretrain-{masking}-{seed}", out / f"weights-{masking}-{seed}"
    if (weights / "config.json").is_file():  # a demo run again into the same --out: keep what it pre-trained
        return weights
    _run(
        "-m",
        "adamae_scale.pretrain",
        "+experiment=demo",
        *CLIP,
        *TASK,
        f"masking={masking}",
        f"train.steps={steps}",
        "train.ckpt_every=0",
        "eval.focus_batches=0",
        "eval.pictures=0",
        "train.image_every=null",
        f"seed={seed}",
        f"data.seed={seed}",
        f"run_dir={run_dir}",
    )
    _run("-m", "adamae_scale.convert.cli", "consolidate", str(run_dir / "checkpoints"), str(weights), "--overwrite")
    return weights


def probe_overrides(probe: str, seed: int, run_dir: Path, clips: int, videos: int) -> list[str]:
    """One probe, the same for every arm: cached features, a sweep of learning rates, the best kept."""
    lrs = "[0.004,0.016,0.064,0.256]" if probe == "attentive" else "[0.1,0.4,1.6,6.4]"
    return [
        f"finetune.mode={probe}",
        f"finetune.lr_sweep={lrs}",
        f"finetune.cache_clips={clips}",
        "data.label_task=motion",
        *TASK,
        "train.steps=300",
        "train.micro_batch_size=64",
        "train.warmup_fraction=0.05",
        "train.log_every=100",
        "precision=fp32",
        f"eval.videos={videos}",
        "eval.temporal_views=1",
        "eval.spatial_views=1",
        "eval.micro_batch_size=128",
        f"seed={seed}",
        f"run_dir={run_dir}",
    ]


def probe(init: str, probe_kind: str, seed: int, run_dir: Path, clips: int, videos: int) -> dict[str, Any]:
    """The sweep in this process; returns its ``sweep.json`` best row."""
    from ..config import compose
    from .run import run

    encoder = [f"init={init}"] + ([*MODEL, *CLIP] if init == "none" else [])
    overrides = [*encoder, *probe_overrides(probe_kind, seed, run_dir, clips, videos)]
    cfg = compose(overrides, config_name="finetune")
    summary = run(cfg)
    return dict(summary["eval"]["sweep_best"])


def separation(table: dict[str, list[float]]) -> tuple[bool, list[str]]:
    """Every pre-trained arm above no pre-training: worst seed over the best untrained one, and the gap of the
    means over three times the larger spread."""
    base = table["none"]
    if len(base) < 2:
        return False, ["one seed has no spread to measure the gap against: run --seeds 3"]
    verdicts, ok = [], True
    for arm in ("adaptive", "random", "tube"):
        values = table[arm]
        spread = max(
            statistics.stdev(values) if len(values) > 1 else 0.0, statistics.stdev(base) if len(base) > 1 else 0.0
        )
        gap = statistics.mean(values) - statistics.mean(base)
        separated = min(values) > max(base) and gap > 3 * spread
        ok &= separated
        verdicts.append(
            f"{ARM_NAMES[arm]} {gap:+.3f} over no pre-training ({gap / spread if spread else float('inf'):.1f} spreads)"
        )
    return ok, verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"runs/demo-probe-{time.strftime('%Y%m%d-%H%M%S')}", help="results folder")
    parser.add_argument("--steps", type=int, default=400, help="pre-training steps per arm (default 400)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--probe", choices=("linear", "attentive"), default="linear")
    parser.add_argument("--train-clips", type=int, default=1024, help="cached training clips per probe")
    parser.add_argument("--videos", type=int, default=512, help="held-out videos per probe")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    jobs = [(masking, seed) for seed in seeds for masking in ARMS if masking != "none"]
    print(f"[demo-probe] pre-training {len(jobs)} encoders ({args.steps} steps each, two at a time)", flush=True)
    with ThreadPoolExecutor(2) as pool:
        weights = dict(zip(jobs, pool.map(lambda job: pretrain(job[0], job[1], args.steps, out), jobs), strict=True))
    pretrained_at = time.perf_counter()
    table: dict[str, list[float]] = {arm: [] for arm in ARMS}
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            init = "none" if arm == "none" else str(weights[(arm, seed)])
            best = probe(init, args.probe, seed, out / f"probe-{arm}-{seed}", args.train_clips, args.videos)
            table[arm].append(best["top1"])
            rows[arm].append(best)
            print(
                f"[demo-probe] seed {seed} {ARM_NAMES[arm]}: top-1 {best['top1']:.3f} (lr {best['lr']:.3g})", flush=True
            )
    separated, verdicts = separation(table)
    minutes = (time.perf_counter() - started) / 60
    chance = 1 / len(MOTION_CLASSES)
    summary = {
        "probe": args.probe,
        "pretrain_steps": args.steps,
        "seeds": seeds,
        "top1": table,
        "mean": {arm: statistics.mean(v) for arm, v in table.items()},
        "spread": {arm: statistics.stdev(v) if len(v) > 1 else 0.0 for arm, v in table.items()},
        "best_heads": rows,
        "chance_top1": chance,
        "separated": separated,
        "minutes": round(minutes, 1),
        "pretrain_minutes": round((pretrained_at - started) / 60, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\n{args.probe} probe, synthetic motion task (4 classes, chance {chance:.2f}), {args.videos} held-out videos, "
        f"{args.steps} pre-training steps, {len(seeds)} seeds:"
    )
    print(f"{'encoder':<18}{'top-1 per seed':<26}{'mean':>8}{'spread':>8}")
    for arm in ARMS:
        per_seed = " ".join(f"{v:.3f}" for v in table[arm])
        print(f"{ARM_NAMES[arm]:<18}{per_seed:<26}{summary['mean'][arm]:>8.3f}{summary['spread'][arm]:>8.3f}")
    print(f"({minutes:.1f} min; {out}/summary.json)")
    print(
        f"[demo-probe] the probe {'SEPARATED' if separated else 'did NOT separate'} the pre-trained encoders from no "
        f"pre-training: " + "; ".join(verdicts),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
