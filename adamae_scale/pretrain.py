"""``adamae-pretrain``: build data → model → loss → engine → trainer, train, report.

Runs as a single process with no launcher, or under ``deepspeed`` / ``torchrun`` / SLURM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import schema
from .data import build_data
from .engine import engines, optim, setup, stage
from .engine.checkpoint import Checkpointer, CheckpointRef, CheckpointWriteError, NoUsableCheckpoint
from .engine.disk import InsufficientSpaceError, check_free_space
from .engine.trainer import Trainer, TrainingDiverged
from .image_hook import panel_hooks, write_pictures
from .metrics import MetricsLogger
from .models import AdaMAE, AdaMAEConfig, build_model
from .objective import AdaMAEObjective, evaluate_focus

# Bytes a DeepSpeed checkpoint holds per parameter (fp32 weights + fp32 master + two AdamW moments):
# the free-space estimate before the first checkpoint exists.
CHECKPOINT_BYTES_PER_PARAM = 16


def validate(cfg: dict[str, Any]) -> AdaMAEConfig:
    """Every check that can fail before a process group or a model exists (``schema.validate``)."""
    return schema.validate(cfg)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """One whole pre-training run from a resolved config; returns the run summary."""
    model_cfg = validate(cfg)
    env = setup.dist_env()
    train = cfg["train"]
    global_batch = train["micro_batch_size"] * train["accumulation"] * env.world_size
    peak_lr = optim.scaled_lr(train["base_lr"], global_batch)
    min_lr = optim.scaled_lr(train["min_lr"], global_batch)
    warmup_steps = round(train["warmup_fraction"] * train["steps"])
    run_dir = Path(cfg["run_dir"])

    with torch.device("meta"):
        num_params = build_model(model_cfg).num_params()
    checkpoint_bytes = CHECKPOINT_BYTES_PER_PARAM * num_params
    # Before anything is built: a full disk is one line now rather than a traceback at the first save.
    check_free_space(run_dir, checkpoint_bytes, "the first checkpoint")

    engine_name = engines.engine_name(cfg)
    engine_fields: dict[str, Any] = {"engine": engine_name}  # recorded with every checkpoint
    if engine_name == "deepspeed":
        ds = stage.resolve_for_run(
            cfg["ds"], num_params, env.world_size, env.rank, train["resume"], run_dir / "checkpoints"
        )
        cfg = {**cfg, "ds": ds}
        engine_fields["ds"] = ds
        engine_label = f"ds={ds}"
    else:
        engine_label = f"engine={engine_name} ({cfg['engine'].get('sharding')})"

    setup.init_distributed(engine_name)
    metadata = {
        "model": model_cfg.to_dict(),
        "precision": cfg["precision"],
        **engine_fields,
        "loss_target": cfg["loss"]["target"],  # how to read the decoder's output (visualisation)
    }
    checkpointer = Checkpointer(
        run_dir / "checkpoints", train["ckpt_every"], metadata, train["keep_last"], checkpoint_bytes
    )
    ds_config, resume_from = engine_config(cfg, env, checkpointer)
    resume_step = resume_from.step if resume_from is not None else 0

    engine = build_engine(cfg, model_cfg, ds_config, peak_lr)
    if env.rank == 0:
        print(
            f"[adamae] {model_cfg.name}: {num_params / 1e6:.1f}M params, {model_cfg.num_tokens} tokens/clip, "
            f"{model_cfg.num_visible} visible ({model_cfg.masking}); world {env.world_size}, "
            f"global batch {global_batch}, "
            f"peak lr {peak_lr:.3g}, {cfg['precision']}, {engine_label}",
            flush=True,
        )
        setup.warn_if_slow_bf16(cfg["precision"])

    data = build_data(cfg["data"], model_cfg, train["micro_batch_size"], env.rank, env.world_size)
    objective = AdaMAEObjective(model_cfg, cfg["loss"]["target"], cfg["masking"]["sampling_loss_weight"], cfg["seed"])
    trainer = Trainer(
        engine,
        objective,
        data,
        checkpointer,
        MetricsLogger(run_dir, enabled=env.rank == 0, resume_step=resume_step),
        lambda step: {
            "cosine": optim.lr_at(step, peak_lr, min_lr, warmup_steps, train["steps"]),
            "constant": optim.lr_at(step, peak_lr, peak_lr, warmup_steps, train["steps"]),
        },
        train["steps"],
        global_batch,
        cfg["seed"],
        train["log_every"],
        max_skipped_in_a_row=train["max_skipped_in_a_row"],
        loss_spike_factor=train["loss_spike_factor"],
        hooks=panel_hooks(cfg, model_cfg),  # TensorBoard pictures of a held-out clip
    )
    trainer.resume(resume_from)
    start = trainer.step
    focus = cfg["data"]["name"] == "synthetic" and cfg["eval"]["focus_batches"] > 0
    summary: dict[str, Any] = {"run_dir": str(run_dir), "resumed_from": start}
    if focus and start == 0:
        summary["eval_before_training"] = focus_report(engine, cfg, model_cfg, env)
    summary.update(trainer.fit(train.get("stop_after")))
    data.close()  # no rendering or loading thread outlives the training loop
    summary["steps"] = trainer.step
    if trainer.stopped_by_signal:
        summary["stopped_by_signal"] = signal.Signals(trainer.stopped_by_signal).name
    elif focus:
        summary["eval"] = focus_report(engine, cfg, model_cfg, env)
        pictures = cfg["eval"].get("pictures", 0)
        if pictures:
            written = write_pictures(engine, cfg, model_cfg, run_dir / "visualize", pictures, env.rank)
            summary["pictures"] = [str(p) for p in written]
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.logger.close()
    del trainer, engine  # they hold the process group: let setup.shutdown destroy it for good
    setup.shutdown()
    return summary


def engine_config(
    cfg: dict[str, Any], env: setup.DistEnv, checkpointer: Checkpointer
) -> tuple[dict[str, Any], CheckpointRef | None]:
    """The run's engine config (a DeepSpeed JSON; engine=fairscale reads its batch, clipping and precision fields)
    and the checkpoint ``train.resume`` names (verified, and written by this engine), converted to DeepSpeed's
    universal format when DeepSpeed wrote it on another world size (elastic resume)."""
    train = cfg["train"]
    resume_from = checkpointer.find(train["resume"])
    ds_config = setup.build_ds_config(
        setup.load_ds_config(cfg["ds"]),
        train["micro_batch_size"],
        train["accumulation"],
        env.world_size,
        cfg["precision"],
        train["clip_grad"],
    )
    if resume_from is not None:
        resume_from = engines.backend(cfg, ds_config).resume_from(resume_from, env.world_size, env.rank == 0)
    return ds_config, resume_from


def build_engine(cfg: dict[str, Any], model_cfg: AdaMAEConfig, ds_config: dict[str, Any], peak_lr: float) -> Any:
    """Model (sharded at birth under ZeRO-3) → AdamW groups → activation checkpointing → the engine of
    ``cfg["engine"]`` (DeepSpeed or fairscale, ``engines.backend``)."""
    train = cfg["train"]
    backend = engines.backend(cfg, ds_config)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = cast(AdaMAE, backend.build_module(lambda: build_model(model_cfg)))
    optimizer = optim.build_adamw(
        model,
        peak_lr,
        train["weight_decay"],
        train["betas"],
        train["eps"],
        cpu_offload=backend.offloads_optimizer(),
        constant_lr_prefixes=train["constant_lr_params"],
    )
    compile_if_asked(cfg, model)  # before checkpointing, which then recomputes the compiled blocks
    model_section = cfg["model"]
    backend.checkpoint_activations(
        model.blocks(), model_section.get("checkpoint_every", 0), model_section.get("checkpoint_offload", False)
    )
    return backend.initialize(model, optimizer)


def compile_if_asked(cfg: dict[str, Any], model: AdaMAE) -> None:
    """``train.compile``: the transformer blocks, the sampler's included (``setup.compile_blocks``)."""
    if cfg["train"].get("compile", False):
        setup.compile_blocks([*model.blocks(), *([model.sampler.block] if model.sampler is not None else [])])


def focus_report(engine: Any, cfg: dict[str, Any], model_cfg: AdaMAEConfig, env: setup.DistEnv) -> dict[str, float]:
    """Focus of the sampler on held-out synthetic clips (the same clips every time it is called)."""
    held_out = build_data(
        {**cfg["data"], "seed": cfg["data"]["eval_seed"]},
        model_cfg,
        cfg["train"]["micro_batch_size"],
        env.rank,
        env.world_size,
    )
    batches = [next(held_out) for _ in range(cfg["eval"]["focus_batches"])]
    held_out.close()
    engine.eval()
    report = evaluate_focus(engine, model_cfg, batches, engine.device)
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
        validate(resolved)
    except (ValueError, FileNotFoundError) as err:
        # A configuration mistake: one line naming the field, before any process group exists.
        print(f"adamae-pretrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    from .data.pipeline import CorruptDataError

    try:
        summary = run(resolved)
    except (InsufficientSpaceError, CheckpointWriteError, NoUsableCheckpoint, TrainingDiverged) as err:
        # A run that cannot go on (full disk, divergence, no usable checkpoint): one line, nothing half-written.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"adamae-pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, (InsufficientSpaceError, NoUsableCheckpoint)) else 1)
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
        # Checked before Hydra creates run_dir and its log there: a bad value leaves nothing behind.
        try:
            validate(schema.compose(overrides))
        except (ValueError, FileNotFoundError) as err:
            print(f"adamae-pretrain: error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
