"""``adamae-bench memory``: how much memory a model needs per rank under a ZeRO stage, and a measured check.

The model-state figures (parameters, gradients, AdamW and ZeRO's fp32 master, as ``engine.stage`` counts them
to choose ``ds=auto``) come from the model's size alone. Activations are not modelled: they depend on batch,
tokens and checkpointing; ``run=true`` measures the whole peak of real ``adamae-pretrain`` steps, which is why
this benchmark launches training and lives beside the other benchmarks rather than in the engine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..engine.setup import load_ds_config
from ..engine.stage import model_state_bytes, resolve_ds
from ..metrics import read_metrics
from .settings import flag, integer

DEFAULTS = {
    "model": "vit_large",
    "engine": "deepspeed",
    "ds": "zero3",
    "sharding": "oss_sdp",
    "world_size": "1",
    "run": "false",
    "steps": "2",
}
# engine=fairscale: the ZeRO stage each sharding matches (what is partitioned over the ranks).
FAIRSCALE_STAGES = {"oss": 1, "oss_sdp": 2, "fsdp": 3}


def zero_stage_and_offload(ds_config: dict[str, Any]) -> tuple[int, bool, bool]:
    zero = ds_config.get("zero_optimization", {})
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_param = zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    return int(zero.get("stage", 0)), offload_opt, offload_param


def estimate(
    model: str,
    ds: str,
    world_size: int,
    overrides: dict[str, Any] | None = None,
    engine: str = "deepspeed",
    sharding: str = "oss_sdp",
) -> dict[str, Any]:
    """Model states per rank of ``model`` on ``world_size`` ranks under DeepSpeed's ``ds`` (``auto`` resolved as
    ``adamae-pretrain`` would on ``world_size`` ranks of this machine) or fairscale's ``sharding``."""
    import torch

    from ..models import build_model, config_for

    cfg = config_for(model, **(overrides or {}))
    with torch.device("meta"):
        num_params = build_model(cfg).num_params()
    if engine == "fairscale":
        if sharding not in FAIRSCALE_STAGES:
            raise ValueError(f"memory: sharding={sharding!r}: expected one of {sorted(FAIRSCALE_STAGES)}")
        stage = FAIRSCALE_STAGES[sharding]
        states = model_state_bytes(num_params, world_size, stage, master_copy=False)
        where = {"engine": engine, "sharding": sharding}
        note = "model states only (fp32 weights, fp32 grads, AdamW moments); activations excluded"
    elif engine == "deepspeed":
        ds, _ = resolve_ds(ds, num_params, world_size, world_size)
        stage, offload_opt, offload_param = zero_stage_and_offload(load_ds_config(ds))
        states = model_state_bytes(num_params, world_size, stage, offload_opt, offload_param)
        where = {"engine": engine, "ds": ds}
        note = "model states only (fp32 weights, fp32 grads, AdamW + ZeRO fp32 master); activations excluded"
    else:
        raise ValueError(f"memory: engine={engine!r}: expected deepspeed or fairscale")
    return {
        "model": model,
        **where,
        "zero_stage": stage,
        "world_size": world_size,
        "params": num_params,
        "bytes_per_rank": {**states["device"]},
        "host_bytes_per_rank": {**states["host"]},
        "note": note,
    }


def measure(
    model: str, engine_args: list[str], world_size: int, overrides: list[str], steps: int = 2
) -> dict[str, Any]:
    """Peak memory per rank of ``steps`` real pre-training steps (resident set size on CPU); ``engine_args``:
    ``ds=...`` or ``engine=fairscale engine.sharding=...``."""
    with tempfile.TemporaryDirectory(prefix="adamae-mem-") as run_dir:
        args = [
            f"model={model}",
            *engine_args,
            f"train.steps={steps}",
            "train.micro_batch_size=1",
            "train.ckpt_every=0",
            "train.log_every=1",
            "eval.focus_batches=0",
            "train.resume=none",
            "data=synthetic",
            f"run_dir={run_dir}",
            *overrides,
        ]
        # Checkpoint writing would dominate the peak for large models; this measures training steps.
        args.append("train.stop_after=" + str(steps))
        if world_size == 1:
            cmd = [sys.executable, "-m", "adamae_scale.pretrain", *args]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(world_size),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(_free_port()),
                "-m",
                "adamae_scale.pretrain",
                *args,
            ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        records = read_metrics(Path(run_dir, "metrics.jsonl"))
    return {
        "measured_peak_bytes_per_rank": int(max(r["mem_peak_bytes"] for r in records)),
        "measured_steps": steps,
        # micro-batch 1 on every rank: a step is world_size clips; the first step includes warm-up.
        "seconds_per_step": world_size / records[-1]["clips_per_s"],
    }


def run(options: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """The model's figures for ``options`` (see ``DEFAULTS``), and the measured peak when ``run`` is true;
    ``overrides`` go to adamae-pretrain (``model.*`` ones also shape the model)."""
    world_size = integer("memory", options, "world_size", 1)
    steps = integer("memory", options, "steps", 1)
    measured = flag("memory", options, "run")
    model_overrides = {
        k.split(".", 1)[1]: _literal(v) for k, _, v in (o.partition("=") for o in overrides) if k.startswith("model.")
    }
    engine = options["engine"]
    report = estimate(options["model"], options["ds"], world_size, model_overrides, engine, options["sharding"])
    if measured:
        engine_args = (
            [f"ds={report['ds']}"]
            if engine == "deepspeed"
            else ["engine=fairscale", f"engine.sharding={report['sharding']}"]
        )
        report.update(measure(options["model"], engine_args, world_size, overrides, steps))
    return report


def _literal(value: str) -> Any:
    import yaml

    return yaml.safe_load(value)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
