"""``adamae-bench parity``: does a cheaper option learn what the paper's method learns? ``make demo`` per option
and seed, in turn, each a fresh ``adamae-pretrain +experiment=demo`` process (nothing shared between runs).

Per run it reads the held-out focus (masks sampled as in training, and the top-k of p) from ``summary.json``,
the final ``loss_rec`` from ``metrics.jsonl`` and the wall time. Per option it reports the seeds' values, their
mean and range, and where the option's mean focus lies against the band (min..max over seeds) of ``default``:
``below`` fails the check; ``within`` and ``above`` pass it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..metrics import read_metrics
from .settings import integer

# Each option, as adamae-pretrain overrides on top of +experiment=demo.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "decoder_cell": ["masking.decoder_ratio=0.5", "masking.decoder_mask=running_cell"],
    "decoder_random": ["masking.decoder_ratio=0.5", "masking.decoder_mask=random"],
    "sampler_half": ["model.sampler_width_ratio=0.5"],
    "sampler_pool": ["model.sampler_pool=2"],
    "sampler_kv_pool": ["model.sampler_kv_pool=2"],
    "sampler_bf16": ["model.sampler_precision=bf16"],
    "fast": ["+preset=fast"],
    "fast_pool": ["+preset=fast", "model.sampler_pool=2", "model.sampler_kv_pool=1"],
    "fast_full_attention": ["+preset=fast", "model.sampler_kv_pool=1"],
}
DEFAULTS = {"variants": ",".join(VARIANTS), "seeds": "3", "parallel": "1"}
FOCUS_KEYS = ("focus_ratio", "focus_ratio_topk")


def run(options: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """``options``: ``variants`` (comma-separated names of ``VARIANTS``), ``seeds`` (0..seeds-1) and ``parallel``
    (runs at a time: on a GPU machine several demos share the device; each run's figures do not depend on it);
    ``overrides``: adamae-pretrain overrides added to every run (e.g. ``train.steps=300`` for a quick look)."""
    names = [n for n in options["variants"].split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"parity: variants={options['variants']}: expected names from {sorted(VARIANTS)}")
    seeds = integer("parity", options, "seeds", 1)
    parallel = integer("parity", options, "parallel", 1)
    runs = [(name, seed) for name in names for seed in range(seeds)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="adamae-parity-") as scratch, ThreadPoolExecutor(parallel) as pool:
        figures = pool.map(
            lambda run: demo_run(Path(scratch) / f"{run[0]}-{run[1]}", run[1], [*VARIANTS[run[0]], *overrides]), runs
        )
        for (name, _), result in zip(runs, figures, strict=True):
            results[name].append(result)
    return report(results, overrides)


def demo_run(run_dir: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    """One ``make demo`` run with ``seed`` (the model's and the data's) and ``overrides``; its figures."""
    cmd = [
        sys.executable,
        "-m",
        "adamae_scale.pretrain",
        "+experiment=demo",
        f"seed={seed}",
        f"data.seed={seed}",
        "eval.pictures=0",
        *overrides,
        f"run_dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise ValueError(f"parity: {' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    figures = {key: round(float(summary["eval"][key]), 4) for key in FOCUS_KEYS if key in summary["eval"]}
    figures["loss_rec"] = round(float(records[-1]["loss_rec"]), 5)
    figures["seconds"] = round(seconds, 1)
    return figures


def report(results: dict[str, list[dict[str, float]]], overrides: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"overrides": VARIANTS[name], "runs": runs}
        for key in (*FOCUS_KEYS, "loss_rec", "seconds"):
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)}
        table[name] = row
    band = table.get("default")
    if band is not None:
        for row in table.values():
            placement = {
                key: _placement(row[key]["mean"], band[key]) for key in FOCUS_KEYS if key in row and key in band
            }
            row["focus_vs_default_band"] = placement
            row["passes"] = all(p != "below" for p in placement.values())
    return {"benchmark": "parity", "demo": "+experiment=demo", "extra_overrides": overrides, "variants": table}


def _placement(value: float, band: dict[str, float]) -> str:
    if value < band["min"]:
        return "below"
    return "above" if value > band["max"] else "within"
