"""Training-step speed of the real engine: ``adamae-bench step``.

One fixed synthetic batch already on the device, so the figure is the model, the losses and the
DeepSpeed engine (ZeRO communication, optimizer, clipping) without the data pipeline, which
``adamae-bench data`` measures on its own. The config is composed from ``configs/`` exactly as
``adamae-pretrain`` composes it, so any pre-training override applies.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import schema
from .data import synthetic_config
from .data.synthetic import SyntheticClips
from .engine import optim, setup
from .engine.trainer import peak_memory_bytes
from .objective import AdaMAEObjective

DEFAULTS = {"steps": "10", "warmup": "3"}


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved pre-training config for ``overrides`` (errors prefixed with ``step:``)."""
    try:
        return schema.compose(["run_dir=unused", *overrides])
    except ValueError as err:
        raise ValueError(f"step: {err}") from err


def measure_steps(overrides: list[str], steps: int, warmup: int) -> dict[str, Any] | None:
    """Time ``steps`` optimizer steps after ``warmup``; returns the report on rank 0, ``None`` elsewhere."""
    from .pretrain import build_engine, validate

    if steps < 1 or warmup < 1:
        raise ValueError(f"step: steps and warmup must be >= 1, got steps={steps} warmup={warmup}")
    cfg = compose(overrides)
    model_cfg = validate(cfg)
    env = setup.dist_env()
    setup.init_distributed()
    micro = int(cfg["train"]["micro_batch_size"])
    ds_config = setup.build_ds_config(
        setup.load_ds_config(cfg["ds"]), micro, 1, env.world_size, cfg["precision"], cfg["train"]["clip_grad"]
    )
    engine = build_engine(cfg, model_cfg, ds_config, optim.scaled_lr(cfg["train"]["base_lr"], micro * env.world_size))
    clips = SyntheticClips(synthetic_config(cfg["data"], model_cfg), micro, env.rank, env.world_size, prefetch=0)
    batch = {key: value.to(engine.device) for key, value in clips.batch(0).items()}
    objective = AdaMAEObjective(model_cfg, cfg["loss"]["target"], cfg["masking"]["sampling_loss_weight"], cfg["seed"])

    def train_step() -> torch.Tensor:
        loss = objective(engine, batch)["loss"]
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for _ in range(warmup):
        train_step()
    with FlopCounterMode(display=False) as counter:  # forward + backward, one rank's micro-batch
        train_step()
    flops = counter.get_total_flops()
    _synchronize(engine.device)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        last = train_step()
    last_loss = float(last)  # waits for the device
    _synchronize(engine.device)
    elapsed = time.perf_counter() - start
    peak = peak_memory_bytes(engine.device)
    setup.shutdown()
    if env.rank != 0:
        return None
    seconds = elapsed / steps
    return {
        "benchmark": "step",
        "model": model_cfg.name,
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
        "clip": [model_cfg.num_frames, *model_cfg.img_size],
        "tokens_per_clip": model_cfg.num_tokens,
        "visible_tokens": model_cfg.num_visible,
        "masking": model_cfg.masking,
        "precision": cfg["precision"],
        "ds": cfg["ds"],
        "checkpoint_every": cfg["model"].get("checkpoint_every", 0),
        "world_size": env.world_size,
        "micro_batch_size": micro,
        "steps_timed": steps,
        "seconds_per_step": round(seconds, 5),
        "clips_per_s": round(micro * env.world_size / seconds, 3),
        "model_tflop_per_step_per_rank": _significant(flops / 1e12),
        "tflops_per_s_per_rank": _significant(flops / seconds / 1e12),
        "peak_memory_bytes_per_rank": peak,
        "loss": round(last_loss, 5),
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(options: dict[str, str], overrides: list[str]) -> dict[str, Any] | None:
    """``options``: ``steps``, ``warmup`` (see ``DEFAULTS``); ``overrides``: adamae-pretrain overrides."""
    return measure_steps(overrides, int(options["steps"]), int(options["warmup"]))
