"""``adamae-pretrain``: build data → model → loss → engine → trainer, train, report.

Runs as a single process with no launcher, or under ``deepspeed`` / ``torchrun`` / SLURM.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # replaced below when CUDA is present
import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

if torch.cuda.is_available() and os.environ["DS_ACCELERATOR"] == "cpu" and "ADAMAE_FORCE_CPU" not in os.environ:
    os.environ["DS_ACCELERATOR"] = "cuda"

from .data import build_data, validate_data  # noqa: E402
from .engine import optim, setup  # noqa: E402
from .engine.checkpoint import Checkpointer  # noqa: E402
from .engine.trainer import Trainer  # noqa: E402
from .metrics import MetricsLogger  # noqa: E402
from .models import build_model, make_config  # noqa: E402
from .objective import AdaMAEObjective, evaluate_focus  # noqa: E402


def validate(cfg: dict[str, Any]):
    """Every check that can fail before a process group or a model exists."""
    model_cfg = make_config(cfg["model"], cfg["masking"])
    validate_data(cfg["data"], model_cfg)
    setup.build_ds_config(setup.load_ds_config(cfg["ds"]), 1, 1, 1, cfg["precision"], 0.0)
    train = cfg["train"]
    for key in ("steps", "micro_batch_size", "accumulation"):
        if int(train[key]) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {train[key]}")
    return model_cfg


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """One whole pre-training run from a resolved config; returns the run summary."""
    model_cfg = validate(cfg)
    env = setup.dist_env()
    train = cfg["train"]
    global_batch = train["micro_batch_size"] * train["accumulation"] * env.world_size
    peak_lr = optim.scaled_lr(train["base_lr"], global_batch)
    min_lr = optim.scaled_lr(train["min_lr"], global_batch)
    run_dir = Path(cfg["run_dir"])

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(model_cfg)
    optimizer = optim.build_adamw(model, peak_lr, train["weight_decay"], train["betas"], train["eps"])
    ds_config = setup.build_ds_config(
        setup.load_ds_config(cfg["ds"]), train["micro_batch_size"], train["accumulation"], env.world_size,
        cfg["precision"], train["clip_grad"],
    )
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters
    engine = setup.initialize(model, optimizer, ds_config)
    if env.rank == 0:
        print(f"[adamae] {model_cfg.name}: {num_params / 1e6:.1f}M params, {model_cfg.num_tokens} tokens/clip, "
              f"{model_cfg.num_visible} visible ({model_cfg.masking}); world {env.world_size}, global batch {global_batch}, "
              f"peak lr {peak_lr:.3g}, {cfg['precision']}, ds={cfg['ds']}", flush=True)

    data = build_data(cfg["data"], model_cfg, train["micro_batch_size"], env.rank, env.world_size)
    objective = AdaMAEObjective(model_cfg, cfg["loss"]["target"], cfg["masking"]["sampling_loss_weight"])
    metadata = {"model": model_cfg.to_dict(), "precision": cfg["precision"], "ds": cfg["ds"]}
    trainer = Trainer(
        engine, objective, data, Checkpointer(run_dir / "checkpoints", train["ckpt_every"], metadata),
        MetricsLogger(run_dir, enabled=env.rank == 0),
        lambda step: optim.lr_at(step, peak_lr, min_lr, round(train["warmup_fraction"] * train["steps"]), train["steps"]),
        train["steps"], global_batch, cfg["seed"], train["log_every"],
    )
    trainer.resume(train["resume"])
    start = trainer.step
    last = trainer.fit(train.get("stop_after"))

    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": trainer.step, "resumed_from": start, **last}
    if cfg["data"]["name"] == "synthetic" and cfg["eval"]["focus_batches"] > 0:
        held_out = build_data({**cfg["data"], "seed": cfg["data"]["eval_seed"]}, model_cfg,
                              train["micro_batch_size"], env.rank, env.world_size)
        engine.eval()
        batches = [next(held_out) for _ in range(cfg["eval"]["focus_batches"])]
        summary["eval"] = evaluate_focus(engine, model_cfg, batches, engine.device)
        engine.train()
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.logger.close()
    setup.shutdown()
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = [f"[adamae] done: {summary['steps']} steps, results in {summary['run_dir']}",
             f"  metrics: {summary['run_dir']}/metrics.jsonl   TensorBoard: {summary['run_dir']}/tb   "
             f"checkpoints: {summary['run_dir']}/checkpoints"]
    if "eval" in summary:
        ev = summary["eval"]
        topk = f"   top-k of p: {ev['focus_ratio_topk']:.2f}" if "focus_ratio_topk" in ev else ""
        lines.append(f"  focus_ratio (held-out clips, motion tokens {ev['motion_token_fraction']:.1%}): "
                     f"sampled masks: {ev['focus_ratio']:.2f}{topk}   random masking: {ev['focus_ratio_random']:.2f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://adamae_scale.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        validate(resolved)
    except (ValueError, FileNotFoundError) as err:
        # A configuration mistake: one line naming the field, before any process group exists.
        print(f"adamae-pretrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    summary = run(resolved)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(summary), flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
