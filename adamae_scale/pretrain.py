"""``adamae-pretrain``: build data → model → loss → engine → trainer, train, report.

Runs as a single process with no launcher, or under ``deepspeed`` / ``torchrun`` / SLURM.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import config
from .builder import RunBuilder, assemble_engine, claim_run_dir
from .config import PretrainConfig
from .data import SyntheticData, build_data
from .engine import optim, setup
from .engine.checkpoint import CheckpointRef, CheckpointWriteError, NoUsableCheckpoint
from .engine.disk import InsufficientSpaceError, check_free_space
from .engine.engines import Backend
from .engine.interface import TrainingEngine
from .engine.run_lock import RunDirBusy
from .engine.trainer import Trainer, TrainingDiverged
from .models import AdaMAE, AdaMAEConfig, build_model, make_config
from .objective import AdaMAEObjective, evaluate_focus
from .visual.tensorboard import panel_hooks, write_pictures

# Bytes a DeepSpeed checkpoint holds per parameter (fp32 weights + fp32 master + two AdamW moments):
# the free-space estimate before the first checkpoint exists.
CHECKPOINT_BYTES_PER_PARAM = 16


def validate(cfg: Mapping[str, Any]) -> PretrainConfig:
    """Every check that can fail before a process group or a model exists: the typed, checked config."""
    return config.load_pretrain(cfg)


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """One whole pre-training run from a checked config; returns the run summary."""
    model_cfg, train, run_dir = cfg.model.arch, cfg.train, cfg.run.run_dir
    with torch.device("meta"):
        num_params = build_model(model_cfg).num_params()
    checkpoint_bytes = CHECKPOINT_BYTES_PER_PARAM * num_params
    # Before anything is built: a full disk is one line now rather than a traceback at the first save.
    check_free_space(run_dir, checkpoint_bytes, "the first checkpoint")

    builder = RunBuilder.start(cfg, num_params)
    engine_fields: dict[str, Any] = {"engine": cfg.engine.name}  # recorded with every checkpoint
    if cfg.engine.name == "deepspeed":
        engine_fields["ds"] = builder.ds
        engine_label = f"ds={builder.ds}"
    else:
        engine_label = f"engine={cfg.engine.name} ({cfg.engine.sharding})"
    metadata = {
        "model": model_cfg.to_dict(),
        "precision": cfg.run.precision,
        **engine_fields,
        "loss_target": cfg.loss.target,  # how to read the decoder's output (visualisation)
    }
    builder.open(metadata, checkpoint_bytes)
    peak_lr = builder.schedule.peak_lr
    engine = build_engine(cfg, builder.backend, peak_lr)
    if builder.is_rank0:
        print(
            f"[adamae] {model_cfg.name}: {num_params / 1e6:.1f}M params, {model_cfg.num_tokens} tokens/clip, "
            f"{model_cfg.num_visible} visible ({model_cfg.masking}); world {builder.env.world_size}, "
            f"global batch {builder.global_batch}, "
            f"peak lr {peak_lr:.3g}, {cfg.run.precision}, {engine_label}",
            flush=True,
        )
        setup.warn_if_slow_bf16(cfg.run.precision)
        if builder.resume_from is not None:
            say_if_the_model_changed(builder.resume_from, model_cfg)

    env = builder.env
    data = build_data(cfg.data, model_cfg, train.micro_batch_size, env.rank, env.world_size)
    objective = AdaMAEObjective(model_cfg, cfg.loss.target, cfg.masking.sampling_loss_weight, cfg.run.seed)
    # TensorBoard pictures of a held-out clip.
    # Trainer: the module's name, which tools and tests may replace with a subclass.
    trainer = builder.trainer(engine, objective, data, hooks=panel_hooks(cfg, model_cfg), trainer_class=Trainer)
    start = trainer.step
    focus = cfg.data.name == "synthetic" and cfg.eval.focus_batches > 0
    summary: dict[str, Any] = {"run_dir": str(run_dir), "resumed_from": start}
    if focus and start == 0:
        summary["eval_before_training"] = focus_report(engine, cfg, env)
    summary.update(trainer.fit(train.stop_after))
    data.close()  # no rendering or loading thread outlives the training loop
    summary["steps"] = trainer.step
    if trainer.stopped_by_signal:
        summary["stopped_by_signal"] = signal.Signals(trainer.stopped_by_signal).name
    elif focus:
        summary["eval"] = focus_report(engine, cfg, env)
        if cfg.eval.pictures:
            written = write_pictures(engine, cfg, model_cfg, run_dir / "visualize", cfg.eval.pictures, env.rank)
            summary["pictures"] = [str(p) for p in written]
    builder.finish(trainer, summary)
    del trainer, engine  # they hold the process group: let setup.shutdown destroy it for good
    setup.shutdown()
    return summary


def say_if_the_model_changed(ref: CheckpointRef, model_cfg: AdaMAEConfig) -> None:
    """Model settings that differ from the resumed checkpoint's, in one warning line. A change of a weight's shape
    fails when the weights load; the others (the sampler's precision or attention, the mask or decoder ratio)
    load silently and change the method from this step on, which whoever resumes with new options should know.
    Settings the checkpoint predates count at their defaults: what the code that wrote it ran."""
    try:
        before = make_config(ref.recorded["model"]).to_dict()
    except (ValueError, KeyError, TypeError):
        return  # no readable record (or one from a newer version): nothing to compare
    now = model_cfg.to_dict()
    changed = [f"{key} {before[key]!r} -> {value!r}" for key, value in now.items() if before.get(key) != value]
    if changed:
        print(
            f"[adamae] warning: train.resume={ref.path} was trained with other model settings: {', '.join(changed)};"
            " training continues with the new ones",
            file=sys.stderr,
            flush=True,
        )


def build_engine(cfg: PretrainConfig, backend: Backend | None, peak_lr: float) -> TrainingEngine:
    """Model (sharded at birth under ZeRO-3) → AdamW groups → ``train.compile`` → activation checkpointing → the
    engine of ``backend`` (DeepSpeed or fairscale)."""
    if backend is None:
        raise RuntimeError("build_engine: the run's backend is not open")
    engine, _ = assemble_engine(
        backend,
        cfg.run.seed,
        lambda: build_model(cfg.model.arch),
        lambda model, backend: prepare_optimizer(cfg, cast(AdaMAE, model), backend, peak_lr),
        lambda model: cast(AdaMAE, model).blocks(),
        cfg.model.checkpoint_every,
        cfg.model.checkpoint_offload,
    )
    return engine


def prepare_optimizer(cfg: PretrainConfig, model: AdaMAE, backend: Backend, peak_lr: float) -> torch.optim.Optimizer:
    """AdamW groups (``train.constant_lr_params`` held at the peak), then ``train.compile`` (before activation
    checkpointing, which then recomputes the compiled blocks)."""
    train = cfg.train
    optimizer = optim.build_adamw(
        model,
        peak_lr,
        train.weight_decay,
        train.betas,
        train.eps,
        cpu_offload=backend.offloads_optimizer(),
        constant_lr_prefixes=train.constant_lr_params,
    )
    compile_if_asked(cfg, model)
    return optimizer


def compile_if_asked(cfg: PretrainConfig, model: AdaMAE) -> None:
    """``train.compile``: the transformer blocks, the sampler's included (``setup.compile_blocks``)."""
    if cfg.train.compile:
        setup.compile_blocks([*model.blocks(), *([model.sampler.block] if model.sampler is not None else [])])


def focus_report(engine: TrainingEngine, cfg: PretrainConfig, env: setup.DistEnv) -> dict[str, float]:
    """Focus of the sampler on held-out synthetic clips (the same clips every time it is called)."""
    data = cast(SyntheticData, cfg.data)
    held_out = build_data(
        replace(data, seed=data.eval_seed), cfg.model.arch, cfg.train.micro_batch_size, env.rank, env.world_size
    )
    batches = [next(held_out) for _ in range(cfg.eval.focus_batches)]
    held_out.close()
    engine.eval()
    report = evaluate_focus(engine, cfg.model.arch, batches, engine.device)
    engine.train()
    return report


def report(summary: dict[str, Any]) -> str:
    if "stopped_by_signal" in summary:
        return (
            f"[adamae] stopped by {summary['stopped_by_signal']} after step {summary['steps']}: checkpoint saved in "
            f"{summary['run_dir']}/checkpoints; run the same command again to resume."
        )
    lines = [
        f"[adamae] done: {summary['steps']} steps, results in {summary['run_dir']}",
        f"  metrics: {summary['run_dir']}/metrics.jsonl   TensorBoard: {summary['run_dir']}/tb   "
        f"checkpoints: {summary['run_dir']}/checkpoints",
    ]
    if "eval" in summary:
        ev = summary["eval"]
        lines.append(
            f"  focus_ratio on held-out clips ({ev['motion_token_fraction']:.1%} of tokens move; "
            f"1.0 = no preference for motion):"
        )
        lines.append(f"    AdaMAE, masks sampled as in training: {ev['focus_ratio']:.2f}")
        if "focus_ratio_topk" in ev:
            lines.append(f"    AdaMAE, top-k of the sampler's p:      {ev['focus_ratio_topk']:.2f}")
        if "eval_before_training" in summary and "focus_ratio_topk" in ev:
            init = summary["eval_before_training"]
            lines.append(
                f"    same sampler before training:         {init['focus_ratio']:.2f} sampled, "
                f"{init['focus_ratio_topk']:.2f} top-k"
            )
        lines.append(f"    random masking baseline (same clips):  {ev['focus_ratio_random']:.2f}")
    if summary.get("pictures"):
        lines.append(
            f"  where the sampler looks ({len(summary['pictures'])} held-out clips; rows: input, p, visible, "
            f"reconstruction, error): {Path(summary['pictures'][0]).parent}/clip-*.png|gif"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://adamae_scale.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    try:
        typed = validate(resolved)
    except (ValueError, FileNotFoundError) as err:
        # A configuration mistake: one line naming the field, before any process group exists.
        print(f"adamae-pretrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    from .data.pipeline import CorruptDataError

    try:
        summary = run(typed)
    except (InsufficientSpaceError, CheckpointWriteError, NoUsableCheckpoint, TrainingDiverged, RunDirBusy) as err:
        # A run that cannot go on (full disk, divergence, no usable checkpoint, its folder in use): one line,
        # nothing half-written.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"adamae-pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, (InsufficientSpaceError, NoUsableCheckpoint, RunDirBusy)) else 1)
    except CorruptDataError as err:  # raised by the rank that counted too many corrupt samples (named in it)
        print(f"adamae-pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(summary), flush=True)
    if "stopped_by_signal" in summary:
        sys.exit(128 + signal.Signals[summary["stopped_by_signal"]].value)


def main() -> None:
    # The deepspeed launcher appends --local_rank=N (also exported as LOCAL_RANK), which Hydra
    # would read as an override: drop it.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    overrides = sys.argv[1:]
    if not any(a.startswith("-") for a in overrides):  # plain overrides (Hydra's own flags go straight to it)
        # Checked before Hydra creates run_dir and its log there: a bad value leaves nothing behind, and a folder
        # another run is using is left alone.
        try:
            sys.argv += claim_run_dir(validate(config.compose(overrides)).run.run_dir, overrides)
        except (ValueError, FileNotFoundError, RunDirBusy) as err:
            print(f"adamae-pretrain: error: {err}", file=sys.stderr)
            sys.exit(2)
    config.register()
    _hydra_main()


if __name__ == "__main__":
    main()
