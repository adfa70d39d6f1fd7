"""``adamae-bench step``: training-step speed of the real engine, read against limits measured in the same run.

One fixed synthetic batch already on the device, so the figure is the model, the losses and the engine (ZeRO
communication, optimizer, clipping) without the data pipeline, which ``adamae-bench data`` measures on its own.
The config is composed from ``configs/`` exactly as ``adamae-pretrain`` composes it, so any pre-training
override applies, and the engine is built by ``pretrain.build_engine`` itself.

A seconds-per-step figure alone does not say whether it is good, so one invocation measures, in this order:

1. the engine: ``warmup`` steps, one step under a FLOP counter, ``steps`` timed steps (``seconds_per_step``,
   peak memory), then, with ``breakdown=true``, ``steps`` more steps with timed regions (``breakdown``): kept
   apart because the region boundaries synchronise the device and would perturb the main figure;
2. with ``baseline=true``: the same model (config and seed), ``AdaMAEObjective`` loss, ``optim.build_adamw``
   AdamW, gradient clipping, batch and precision (bf16 autocast around the model's forward with fp32
   weights, which is what the DeepSpeed config's ``torch_autocast`` does) stepped in plain torch: forward,
   backward, clip, ``optimizer.step``, ``zero_grad``; ``warmup`` then ``steps`` timed the same way
   (``baseline_seconds_per_step``, ``engine_overhead`` = engine ÷ plain). On several ranks every rank runs its
   own plain step at the same time and rank 0's is reported: one process's step with no gradient
   communication (the optimizer's one-flag non-finite check aside). It needs the whole model and optimizer
   on each rank: ``baseline=false`` for a model that only fits sharded;
3. with ``compare_random=true``: the engine again with ``masking=random`` at the same ratio, everything else
   equal (``random_seconds_per_step``, ``adaptive_over_random``);
4. a matmul peak in the step's dtype (``peak_tflops``, ``mfu`` = model FLOP/s ÷ peak), measured just before the
   engine's timed steps and again after everything, the higher kept: on a shared machine one short measurement
   caught in a slow moment read 0.21 TFLOP/s instead of ~0.38 and doubled ``mfu``.

The sequential order keeps one model in memory at a time (each engine is destroyed before the next build);
on a busy machine compare figures from one run, and repeat runs to see the spread.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .. import config
from ..base import collectives
from ..config import PretrainConfig
from ..data import synthetic_config
from ..data.synthetic import SyntheticClips
from ..engine import engines, optim, setup, stage
from ..engine.trainer import peak_memory_bytes
from ..models import AdaMAE, AdaMAEConfig, build_model
from ..objective import AdaMAEObjective
from .flops import attention_flops, flop_counter, matmul_peak_tflops
from .settings import flag, integer

DEFAULTS = {"steps": "10", "warmup": "3", "baseline": "true", "breakdown": "true", "compare_random": "false"}
BREAKDOWN_PARTS = ("sampler", "encoder", "decoder", "loss", "backward", "optimizer", "other")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepOptions:
    steps: int = 10
    warmup: int = 3
    baseline: bool = True
    breakdown: bool = True
    compare_random: bool = False

    @classmethod
    def parse(cls, options: dict[str, str]) -> StepOptions:
        """The benchmark's own settings (``DEFAULTS``' keys), each bad value a one-line ``ValueError``."""
        return cls(
            steps=integer("step", options, "steps", 1),
            warmup=integer("step", options, "warmup", 1),
            baseline=flag("step", options, "baseline"),
            breakdown=flag("step", options, "breakdown"),
            compare_random=flag("step", options, "compare_random"),
        )


@dataclass
class EngineRun:
    """What one engine's timed steps measured."""

    seconds: float
    loss: float
    device: torch.device
    params: int
    flops: int = 0
    attention_flops: int = 0
    peak_memory: int = 0
    peak_tflops: float = 0.0  # the matmul peak measured just before the timed steps (``detailed`` only)
    breakdown: dict[str, float] | None = None


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved pre-training config for ``overrides`` (errors prefixed with ``step:``)."""
    try:
        return config.compose(["run_dir=unused", *overrides])
    except ValueError as err:
        raise ValueError(f"step: {err}") from err


def run(options: dict[str, str], overrides: list[str]) -> dict[str, Any] | None:
    """``options``: see ``DEFAULTS`` and ``StepOptions``; ``overrides``: adamae-pretrain overrides. Returns the
    report on rank 0, ``None`` on the other ranks."""
    return measure(overrides, StepOptions.parse(options))


def measure(overrides: list[str], opts: StepOptions) -> dict[str, Any] | None:
    """Everything a config check can refuse is refused before the process group starts (one-line errors);
    then the measurements in the module docstring's order, on every rank."""
    cfg = _config(overrides)
    model_cfg = cfg.model.arch
    random_cfg = None
    if opts.compare_random:
        if model_cfg.masking != "adaptive":
            raise ValueError(f"step: compare_random=true: expected masking=adaptive, got masking={model_cfg.masking}")
        random_cfg = _config(_random_masking(overrides, cfg.masking.ratio))
    env = setup.dist_env()
    with torch.device("meta"):
        num_params = build_model(model_cfg).num_params()
    ds, _ = stage.resolve_ds(cfg.run.ds, num_params, env.world_size, stage.local_world_size(env.world_size))
    requested_ds, cfg = cfg.run.ds, cfg.with_ds(ds)
    setup.init_distributed()
    if env.rank == 0:
        setup.warn_if_slow_bf16(cfg.run.precision, file=sys.stderr)  # stdout is the JSON report

    timed = time_engine(cfg, model_cfg, env, opts, detailed=True)
    _free_memory(timed.device)
    baseline = time_plain(cfg, model_cfg, env, opts, timed.device) if opts.baseline else None
    _free_memory(timed.device)
    random = None
    if random_cfg is not None:
        random = time_engine(random_cfg.with_ds(ds), random_cfg.model.arch, env, opts, detailed=False)
        _free_memory(timed.device)
    collectives.barrier()  # every rank measures the peak at the same time, as they step
    peak = max(timed.peak_tflops, matmul_peak_tflops(timed.device, _peak_dtype(cfg)))
    setup.shutdown()
    if env.rank != 0:
        return None

    micro = cfg.train.micro_batch_size
    seconds = timed.seconds
    engine_name = cfg.engine.name
    report: dict[str, Any] = {
        "benchmark": "step",
        "model": model_cfg.name,
        "params": timed.params,
        "clip": [model_cfg.num_frames, *model_cfg.img_size],
        "tokens_per_clip": model_cfg.num_tokens,
        "visible_tokens": model_cfg.num_visible,
        "masking": model_cfg.masking,
        "sampler_precision": model_cfg.sampler_precision,
        "precision": cfg.run.precision,
        "engine": engine_name,
        # DeepSpeed's stage that ran (and the requested one when ds=auto chose it); other engines ignore ds.
        **({"ds": ds} if engine_name == "deepspeed" else {}),
        **({"ds_requested": requested_ds} if engine_name == "deepspeed" and requested_ds != ds else {}),
        "checkpoint_every": cfg.model.checkpoint_every,
        "compile": cfg.train.compile,
        "world_size": env.world_size,
        "micro_batch_size": micro,
        "steps_timed": opts.steps,
        "seconds_per_step": round(seconds, 5),
        "clips_per_s": round(micro * env.world_size / seconds, 3),
        "model_tflop_per_step_per_rank": _significant(timed.flops / 1e12),
        "attention_tflop_per_step_per_rank": _significant(timed.attention_flops / 1e12),
        "tflops_per_s_per_rank": _significant(timed.flops / seconds / 1e12),
        "peak_tflops": _significant(peak),
        "peak_dtype": "bf16" if _peak_dtype(cfg) == torch.bfloat16 else "fp32",
        "native_bf16": setup.native_bf16(timed.device.type),
        "mfu": _significant(timed.flops / seconds / (peak * 1e12)),
    }
    if baseline is not None:
        report["baseline_seconds_per_step"] = round(baseline, 5)
        report["engine_overhead"] = _significant(seconds / baseline)
    if timed.breakdown is not None:
        report["breakdown"] = timed.breakdown
    if random is not None:
        report["random_seconds_per_step"] = round(random.seconds, 5)
        report["adaptive_over_random"] = _significant(seconds / random.seconds)
    report.update(
        peak_memory_bytes_per_rank=timed.peak_memory,
        loss=round(timed.loss, 5),
        device=torch.cuda.get_device_name(timed.device) if timed.device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    return report


def time_engine(
    cfg: PretrainConfig, model_cfg: AdaMAEConfig, env: setup.DistEnv, opts: StepOptions, detailed: bool
) -> EngineRun:
    """Warm-up and timed steps of the engine ``pretrain.build_engine`` builds; with ``detailed`` also the FLOP
    count, the peak memory and (``opts.breakdown``) the breakdown. The engine is destroyed before returning."""
    from ..pretrain import build_engine

    backend = engines.backend(dataclasses.replace(cfg.engine_spec(), accumulation=1), env.world_size)
    engine = build_engine(cfg, backend, _peak_lr(cfg, env))
    device = engine.device
    batch = fixed_batch(cfg, model_cfg, env, device)
    objective = _objective(cfg, model_cfg)

    def train_step() -> torch.Tensor:
        loss = objective(engine, batch)["loss"]
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for _ in range(opts.warmup):
        train_step()
    result = EngineRun(0.0, 0.0, device, _num_params(engine.module))
    if detailed:
        with flop_counter() as counter:  # forward + backward, one rank's micro-batch
            train_step()
        result.flops, result.attention_flops = counter.get_total_flops(), attention_flops(counter)
    if detailed:
        result.peak_tflops = matmul_peak_tflops(device, _peak_dtype(cfg))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result.seconds, result.loss = time_steps(train_step, opts.steps, device)
    if detailed:
        result.peak_memory = peak_memory_bytes(device)
        if opts.breakdown:
            result.breakdown = measure_breakdown(
                cast(AdaMAE, engine.module), engine, objective, batch, engine.backward, engine.step, opts.steps, device
            )
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    return result


def time_plain(
    cfg: PretrainConfig, model_cfg: AdaMAEConfig, env: setup.DistEnv, opts: StepOptions, device: torch.device
) -> float:
    """Seconds per step of the same model, loss, AdamW, clipping, batch and precision in plain torch."""
    from ..pretrain import compile_if_asked

    train = cfg.train
    torch.manual_seed(cfg.run.seed)  # the engine's initial weights
    model = build_model(model_cfg).to(device)
    optimizer = optim.build_adamw(
        model,
        _peak_lr(cfg, env),
        train.weight_decay,
        train.betas,
        train.eps,
        constant_lr_prefixes=train.constant_lr_params,
    )
    compile_if_asked(cfg, model)  # before checkpointing, as pretrain.build_engine does
    setup.apply_activation_checkpointing(model.blocks(), cfg.model.checkpoint_every)
    forward = autocast_forward(model, cfg.run.precision, device)
    batch = fixed_batch(cfg, model_cfg, env, device)
    objective = _objective(cfg, model_cfg)
    clip = float(train.clip_grad)

    def train_step() -> torch.Tensor:
        loss = objective(forward, batch)["loss"]
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(opts.warmup):
        train_step()
    collectives.barrier()
    seconds, _ = time_steps(train_step, opts.steps, device)
    collectives.barrier()
    return seconds


def autocast_forward(model: nn.Module, precision: str, device: torch.device) -> Callable[..., Any]:
    """``model``'s forward under bf16 autocast when ``precision`` is bf16, as DeepSpeed's ``torch_autocast``
    runs the engine's forward (the loss outside it)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(*args, **kwargs)

    return forward


def time_steps(train_step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step over ``steps`` calls, the last loss), the device drained before and after."""
    _synchronize(device)
    start = time.perf_counter()
    last = torch.zeros(())
    for _ in range(steps):
        last = train_step()
    loss = float(last)  # waits for the device
    _synchronize(device)
    return (time.perf_counter() - start) / steps, loss


class RegionTimer:
    """Seconds spent in named regions: spans around calls, and forward pre/post hooks on sub-modules (the model
    itself is not touched). Each boundary synchronises the device, so these steps are timed apart."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._starts: dict[str, float] = {}

    def _start(self, name: str) -> None:
        _synchronize(self.device)
        self._starts[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        _synchronize(self.device)
        self.totals[name] += time.perf_counter() - self._starts.pop(name)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._start(name)
        try:
            yield
        finally:
            self._stop(name)

    def hook(self, module: nn.Module, name: str) -> list[Any]:
        """Time ``module``'s forward calls as ``name``; returns the handles to remove."""
        return [
            module.register_forward_pre_hook(lambda *_: self._start(name)),
            module.register_forward_hook(lambda *_: self._stop(name)),
        ]


def measure_breakdown(
    model: AdaMAE,
    forward: Callable[..., Any],
    objective: AdaMAEObjective,
    batch: Batch,
    backward: Callable[[torch.Tensor], Any],
    step: Callable[[], Any],
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    """Seconds per step in each part of ``steps`` training steps (``BREAKDOWN_PARTS``):

    - ``sampler``: the token sampler's block and head (0 without one);
    - ``encoder``: tubelet embedding, then the ViT over the visible tokens;
    - ``decoder``: the encoder-to-decoder projection and the decoder with its head;
    - ``loss``: the objective outside the model's forward (targets, losses, the focus metric);
    - ``backward``, ``optimizer``: the engine's (or plain torch's) backward and step calls;
    - ``other``: the rest of the step: mask sampling and token gathers, the engine's forward wrapper.
    """
    timer = RegionTimer(device)
    regions: list[tuple[nn.Module | None, str]] = [
        (model.sampler, "sampler"),
        (model.encoder.patch_embed, "patch_embed"),
        (model.encoder, "encoder"),
        (model.encoder_to_decoder, "encoder_to_decoder"),
        (model.decoder, "decoder"),
    ]
    handles = [handle for module, name in regions if module is not None for handle in timer.hook(module, name)]

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        with timer.span("model"):
            return forward(*args, **kwargs)

    try:
        for _ in range(steps):
            with timer.span("step"):
                with timer.span("objective"):
                    loss = objective(timed_forward, batch)["loss"]
                with timer.span("backward"):
                    backward(loss)
                with timer.span("optimizer"):
                    step()
    finally:
        for handle in handles:
            handle.remove()
    t = {name: total / steps for name, total in timer.totals.items()}
    parts = {
        "sampler": t.get("sampler", 0.0),
        "encoder": t["patch_embed"] + t["encoder"],
        "decoder": t["encoder_to_decoder"] + t["decoder"],
        "loss": t["objective"] - t["model"],
        "backward": t["backward"],
        "optimizer": t["optimizer"],
    }
    parts["other"] = t["step"] - sum(parts.values())
    return {name: round(max(parts[name], 0.0), 5) for name in BREAKDOWN_PARTS}


def fixed_batch(cfg: PretrainConfig, model_cfg: AdaMAEConfig, env: setup.DistEnv, device: torch.device) -> Batch:
    """This rank's first synthetic batch on ``device``: the same clips for every measurement of a run."""
    micro = cfg.train.micro_batch_size
    clips = SyntheticClips(synthetic_config(cfg.data, model_cfg), micro, env.rank, env.world_size, prefetch=0)
    return {key: value.to(device) for key, value in clips.batch(0).items()}


def _config(overrides: list[str]) -> PretrainConfig:
    cfg = compose(overrides)
    try:
        return config.load_pretrain(cfg)
    except ValueError as err:
        raise ValueError(f"step: {err}") from err


def _random_masking(overrides: list[str], ratio: float) -> list[str]:
    """``overrides`` with random masking at ``ratio`` instead of whatever masking they chose."""
    kept = [o for o in overrides if not o.startswith(("masking=", "masking.strategy=", "masking.ratio="))]
    return [*kept, "masking=random", f"masking.ratio={ratio}"]


def _objective(cfg: PretrainConfig, model_cfg: AdaMAEConfig) -> AdaMAEObjective:
    return AdaMAEObjective(model_cfg, cfg.loss.target, cfg.masking.sampling_loss_weight, cfg.run.seed)


def _peak_dtype(cfg: PretrainConfig) -> torch.dtype:
    """The dtype of the matmul peak a step is read against: bf16 for a bf16 (autocast) step, else fp32."""
    return torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32


def _peak_lr(cfg: PretrainConfig, env: setup.DistEnv) -> float:
    return optim.scaled_lr(cfg.train.base_lr, cfg.train.micro_batch_size * env.world_size)


def _num_params(module: nn.Module) -> int:
    """The whole model's parameter count, also when ZeRO-3 holds one shard of each parameter here."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
