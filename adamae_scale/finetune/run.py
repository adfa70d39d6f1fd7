"""``adamae-finetune``: a pre-trained encoder → an action-recognition classifier, trained and evaluated with the
same engine, trainer, checkpoints and launchers as pre-training.

source (init=) → classifier (encoder over all tokens, mean pooling, fc_norm, head) → layer-decayed AdamW →
DeepSpeed engine → Trainer (repeated augmentation, mixup/cutmix, label smoothing, optional model EMA) →
checkpoints → multi-view evaluation (``RUN_DIR/eval.json``, ``RUN_DIR/predictions.jsonl``,
``RUN_DIR/confusion_matrix.png``, with the class names of ``labels.py``).

``finetune.mode=linear|attentive`` freezes the encoder and trains a linear head on the token mean, or an
attentive pooler and head on every token, through the same engine; ``finetune.lr_sweep`` instead trains a sweep
of probe heads on cached features in one process (``sweep.py``). See docs/frozen_evaluation.md.

Repeated augmentation: ``train.micro_batch_size`` counts views, ``finetune.repeated_aug`` of each decoded clip
(``micro_batch_size / repeated_aug`` clips per micro-batch), as the reference's loader hands out
``batch_size × num_sample`` views; the lr is scaled by the global batch in clips, as the reference scales it
by its ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .. import config
from ..base.collectives import all_reduce, any_rank, gather_objects
from ..builder import RunBuilder, claim_run_dir
from ..config import FinetuneConfig
from ..config.checks import check_data, model_config
from ..convert.errors import ConvertError
from ..data import ShardData, SyntheticData, build_data, storage
from ..data.synthetic import MOTION_CLASSES
from ..engine import optim, setup
from ..engine.checkpoint import CheckpointWriteError, NoUsableCheckpoint
from ..engine.disk import InsufficientSpaceError
from ..engine.engines import Backend
from ..engine.interface import TrainingEngine
from ..engine.run_lock import RunDirBusy
from ..engine.trainer import Trainer, TrainingDiverged
from ..models import AdaMAEConfig, make_config
from ..models.classifier import VideoClassifier
from . import evaluate
from .ema import ClassifierEma
from .labels import class_names
from .outputs import ClassifierHead, attentive_spec, save_classifier, write_classifier, write_evaluation
from .recipe import ClassificationObjective, ClipMixup, param_groups
from .sources import EncoderSource, KeyReport, classifier_config, classifier_state, load_source
from .views import rank_views, single_view_batches


def validate(
    raw: Mapping[str, Any] | FinetuneConfig, weights: bool = True
) -> tuple[FinetuneConfig, EncoderSource, AdaMAEConfig, int]:
    """Every check before a process group exists: (the checked config, the source, the classifier's
    architecture, classes). ``weights=False``: the source's architecture only, not its tensors (the command's
    check before Hydra)."""
    cfg = raw if isinstance(raw, FinetuneConfig) else config.load_finetune(raw)
    source = load_source(cfg.init, weights)
    if source.cfg is not None and cfg.model:
        raise ValueError(
            f"init={cfg.init} gives the architecture: drop model= (use clip.num_frames / clip.img_size for the clip)"
        )
    scratch = make_config(cfg.model) if cfg.model else None
    model_cfg = classifier_config(source, scratch, dataclasses.asdict(cfg.clip), cfg.finetune.encoder_drop_path)
    model_cfg = model_config(model_cfg.to_dict())
    check_data(cfg.data, model_cfg)
    if isinstance(cfg.data, ShardData) and not cfg.data.val_urls:
        raise ValueError(
            "data.val_urls: not set; with data=shards every evaluation (eval.every, the final multi-view test, "
            "an lr sweep's choice of head) runs on these held-out shards: pass them (the training shards only if "
            "you mean to score on them)"
        )
    attentive_spec(cfg, model_cfg)  # the pooler's heads divide the width
    classes = num_classes(cfg)
    class_names(cfg.data, classes)  # the label maps of data.urls and data.val_urls agree
    return cfg, source, model_cfg, classes


def num_classes(cfg: FinetuneConfig) -> int:
    """``num_classes``, or what the data says: the synthetic motion task's classes, the shards' label map."""
    if cfg.num_classes is not None:
        return int(cfg.num_classes)
    data = cfg.data
    if isinstance(data, SyntheticData):
        if data.label_task == "none":
            raise ValueError("data=synthetic has no labels unless data.label_task=motion")
        return len(MOTION_CLASSES)
    urls = str(data.urls)
    manifest = urls if urls.endswith(".json") else storage.join(urls, "manifest.json")  # a folder, local or s3://
    if "{" not in urls and storage.exists(manifest):
        labels = json.loads(storage.read_text(manifest)).get("label_map") or {}
        if labels:
            return len(labels)
    manifest = storage.redact(manifest)
    raise ValueError(f"num_classes: not given and {manifest} has no label_map; pass num_classes=K")


def run(raw: Mapping[str, Any] | FinetuneConfig) -> dict[str, Any]:
    cfg, source, model_cfg, classes = validate(raw)
    if cfg.finetune.lr_sweep is not None:
        from .sweep import run_sweep

        return run_sweep(cfg, source, model_cfg, classes)
    train, tune, run_dir = cfg.train, cfg.finetune, cfg.run.run_dir
    repeats = tune.views_per_clip
    head = ClassifierHead(classes, class_names(cfg.data, classes), attentive_spec(cfg, model_cfg))
    attentive = head.attentive

    with torch.device("meta"):
        num_params = sum(p.numel() for p in VideoClassifier(model_cfg, classes, attentive=attentive).parameters())
    builder = RunBuilder.start(cfg, num_params, views_per_clip=repeats)  # the lr scales by clips, as the reference
    cfg.check_stage(builder.ds)  # again, with the stage auto chose (model EMA needs whole weights)
    cfg = cfg.with_ds(builder.ds)
    env, global_batch, peak_lr = builder.env, builder.global_batch, builder.schedule.peak_lr
    metadata = {
        "model": model_cfg.to_dict(),
        "num_classes": classes,
        "class_names": head.names,
        "task": "classification",
        "ds": builder.ds,
        **({"attentive": attentive.to_dict()} if attentive is not None else {}),
    }
    builder.open(metadata)

    ema: ClassifierEma | None = None
    groups: list[dict[str, Any]] = []
    report: KeyReport | None = None

    def prepare(module: torch.nn.Module, backend: Backend) -> torch.optim.Optimizer:
        nonlocal ema, groups, report
        expected = {name: _full_shape(p) for name, p in module.named_parameters()}
        state, report = classifier_state(source, expected)
        backend.load_weights(module, state)
        groups = param_groups(module, tune.mode, train.weight_decay, tune.layer_decay)
        if tune.model_ema:  # from the fp32 weights, before the engine casts them (and before checkpointing wraps)
            dtype = torch.bfloat16 if cfg.run.precision == "bf16" else None
            ema = ClassifierEma(module, tune.model_ema_decay, dtype)
        return optim.adamw(groups, peak_lr, train.betas, train.eps, backend.offloads_optimizer())

    engine, _ = builder.build_engine(
        lambda: VideoClassifier(model_cfg, classes, tune.head_init_scale, tune.head_dropout, attentive),
        prepare,
        lambda module: cast(VideoClassifier, module).block_list(),
        tune.checkpoint_every,
    )
    if ema is not None:
        ema.to(engine.device)
    if env.rank == 0:
        trainable = sum(p.numel() for g in groups for p in g["params"])
        batch = f"{global_batch}"
        if repeats > 1:
            batch += f" views ({global_batch // repeats} clips x {repeats})"
        extras = f", model EMA {tune.model_ema_decay}" if ema is not None else ""
        print(
            f"[adamae] finetune ({tune.mode}) {model_cfg.name}: {classes} classes, "
            f"{trainable / 1e6:.2f}M trainable, "
            f"clip {model_cfg.num_frames}x{model_cfg.img_size[0]}x{model_cfg.img_size[1]}; world {env.world_size}, "
            f"global batch {batch}, peak lr {peak_lr:.3g}{extras}, {cfg.run.precision}, ds={cfg.run.ds}\n"
            f"[adamae] {cast(KeyReport, report).summary()}",
            flush=True,
        )
        setup.warn_if_slow_bf16(cfg.run.precision)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "init_report.json").write_text(json.dumps(cast(KeyReport, report).to_dict(), indent=2))

    mix = None
    if tune.mixing:
        mix = ClipMixup(tune.mixup, tune.cutmix, tune.mixup_switch_prob, tune.label_smoothing, classes)
    objective = ClassificationObjective(classes, tune.label_smoothing, mix, tune.random_erasing if tune.full else 0.0)
    train_data = dataclasses.replace(cfg.data, repeated_aug=repeats)
    if isinstance(train_data, ShardData):
        train_data = dataclasses.replace(train_data, rand_augment=tune.rand_augment if tune.full else None)
    data = build_data(train_data, model_cfg, train.micro_batch_size, env.rank, env.world_size)
    hooks: list[Any] = [ema.step_hook] if ema is not None else []  # first: validation sees the updated average
    if cfg.eval.every > 0:
        hooks.append(ValidationHook(cfg, model_cfg, env, ema))
    trainer = cast(
        FinetuneTrainer,
        builder.trainer(engine, objective, data, hooks=hooks, name="finetune", trainer_class=FinetuneTrainer, ema=ema),
    )
    summary: dict[str, Any] = {"run_dir": str(run_dir), "resumed_from": trainer.step}
    if not cfg.eval_only:
        summary.update(trainer.fit(train.stop_after))
    data.close()
    summary["steps"] = trainer.step
    if trainer.stopped_by_signal:
        summary["stopped_by_signal"] = signal.Signals(trainer.stopped_by_signal).name
    elif trainer.step >= train.steps or cfg.eval_only:
        if not cfg.eval_only:
            save_classifier(engine, model_cfg, head, run_dir / "model", env)
            if ema is not None and env.rank == 0:
                write_classifier(ema.state_dict(), model_cfg, head, run_dir / "model_ema", tune.model_ema_decay)
        # eval_only without a checkpoint holding an average: there is no EMA to report.
        tested_ema = ema if ema is not None and (trainer.ema_restored or not cfg.eval_only) else None
        summary["eval"] = final_evaluation(engine, cfg, model_cfg, head, env, run_dir, tested_ema)
    builder.finish(trainer, summary)
    del trainer, engine  # they hold the process group: let setup.shutdown destroy it for good
    setup.shutdown()
    return summary


class FinetuneTrainer(Trainer):
    """The trainer, with the model EMA (if any) in its checkpointed state: a resumed run averages on exactly as
    the uninterrupted one. The average travels in DeepSpeed's client state, written by rank 0 only (under ZeRO
    0-2 the model-states file is rank 0's, and every rank holds the same average)."""

    def __init__(self, *args: Any, ema: ClassifierEma | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ema = ema
        self.ema_restored = False

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema is not None and self.rank == 0:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.ema is None:
            return
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
            self.ema_restored = True
            return
        self.ema.reset(self.engine.module)
        self._say(f"[adamae] resume: the checkpoint holds no model EMA; the average starts at step {self.step}")


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return cast(torch.Size, getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions keep the full shape here


# -- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def final_evaluation(
    engine: TrainingEngine,
    cfg: FinetuneConfig,
    model_cfg: AdaMAEConfig,
    head: ClassifierHead,
    env: setup.DistEnv,
    run_dir: Path,
    ema: ClassifierEma | None = None,
) -> dict[str, Any]:
    """The multi-view test: softmax averaged over each video's views; rank 0 gathers every rank's predictions,
    writes ``eval.json`` and ``predictions.jsonl``; every rank returns the metrics. With ``ema``, the averaged
    weights are tested on the same decoded views too: ``ema_top1`` … in ``eval.json``, ``predictions_ema.jsonl``."""
    views_cfg = cfg.eval
    views = views_cfg.temporal_views * views_cfg.spatial_views
    chunk = views_cfg.micro_batch_size
    skipped: list[str] = []
    items = rank_views(cfg, model_cfg, env, skipped)
    idle = torch.zeros(1, model_cfg.in_chans, model_cfg.num_frames, *model_cfg.img_size)
    local, local_ema = [], []
    engine.eval()
    while True:
        item = next(items, None)
        # Ranks go in lock step until all are done (ZeRO-3 gathers weights collectively in every forward); a rank
        # out of videos runs the same forward passes on an idle batch.
        if not any_rank(item is not None, engine.device):
            break
        clips = item.views if item is not None else idle.expand(views, *idle.shape[1:])
        logits = torch.cat([engine(part.to(engine.device)) for part in clips.split(chunk)]).float()
        if item is not None:
            local.append(_prediction(item, logits, views))
            if ema is not None:  # a plain module on this rank: no lock step needed
                logits = torch.cat([ema(part.to(engine.device)) for part in clips.split(chunk)]).float()
                local_ema.append(_prediction(item, logits, views))
    engine.train()
    predictions = evaluate.gather_predictions(local)
    metrics, rows = evaluate.summarize(predictions, head.classes, head.names)
    ema_rows: list[dict[str, Any]] = []
    if ema is not None:
        ema_metrics, ema_rows = evaluate.summarize(evaluate.gather_predictions(local_ema), head.classes, head.names)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "videos"})
    skipped_all = [line for part in gather_objects(skipped) for line in part]
    metrics.update(
        {
            "temporal_views": views_cfg.temporal_views,
            "spatial_views": views_cfg.spatial_views,
            "skipped": len(skipped_all),
        }
    )
    if env.rank == 0:
        write_evaluation(run_dir, metrics, rows, skipped_all, ema_rows if ema is not None else None)
    return metrics


def _prediction(item: evaluate.VideoViews, logits: torch.Tensor, views: int) -> evaluate.Prediction:
    probs = evaluate.average_views(logits, views)[0].cpu()
    return evaluate.Prediction(item.index, item.key, item.label, probs, item.source)


class ValidationHook:
    """Every ``eval.every`` steps: single-view top-1 on ``eval.batches`` held-out batches, logged as ``val_top1``
    (and ``val_ema_top1`` for the model EMA's weights): the synthetic task's held-out clips, or the centre clips of
    the first videos of ``data.val_urls``."""

    def __init__(
        self, cfg: FinetuneConfig, model_cfg: AdaMAEConfig, env: setup.DistEnv, ema: ClassifierEma | None = None
    ):
        data = cfg.data
        if isinstance(data, SyntheticData):
            held_out = dataclasses.replace(data, seed=data.eval_seed)
            stream = build_data(held_out, model_cfg, cfg.eval.micro_batch_size, env.rank, env.world_size)
            self.batches = [next(stream) for _ in range(cfg.eval.batches)]
            stream.close()
        else:
            self.batches = single_view_batches(cfg, model_cfg, env)
        self.every = cfg.eval.every
        self.ema = ema

    @torch.no_grad()
    def __call__(self, trainer: Trainer, last_step: bool) -> None:
        if trainer.step % self.every:
            return
        trainer.engine.eval()
        hits = ema_hits = total = 0
        for batch in self.batches:
            video = batch["video"].to(trainer.engine.device)
            hits += int((trainer.engine(video).argmax(-1).cpu() == batch["label"]).sum())
            if self.ema is not None:
                ema_hits += int((self.ema(video).argmax(-1).cpu() == batch["label"]).sum())
            total += len(batch["label"])
        trainer.engine.train()
        local = [float(hits), float(ema_hits), float(total)]
        counts = torch.tensor(all_reduce(local, "sum", torch.float32, trainer.engine.device), dtype=torch.float32)
        values = {"val_top1": float(counts[0] / counts[2].clamp(min=1.0))}
        if self.ema is not None:
            values["val_ema_top1"] = float(counts[1] / counts[2].clamp(min=1.0))
        trainer.logger.log(trainer.step, values)


# -- entry point ---------------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path="pkg://adamae_scale.configs", config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    try:
        summary = run(resolved)
    except (
        ValueError,
        FileNotFoundError,
        ConvertError,
        InsufficientSpaceError,
        NoUsableCheckpoint,
        RunDirBusy,
    ) as err:
        print(f"adamae-finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (CheckpointWriteError, TrainingDiverged) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"adamae-finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        if "eval" in summary:
            ev = summary["eval"]
            print(
                f"[adamae] done: {summary['steps']} steps; {ev['videos']} videos, "
                f"{ev['temporal_views']}x{ev['spatial_views']} views: top-1 {ev['top1']:.3f}, top-5 {ev['top5']:.3f}, "
                f"mean class {ev['mean_class_accuracy']:.3f}"
                + (f"; EMA top-1 {ev['ema_top1']:.3f}, top-5 {ev['ema_top5']:.3f}" if "ema_top1" in ev else "")
                + f"; {summary['run_dir']}/eval.json",
                flush=True,
            )
        else:
            print(f"[adamae] stopped after step {summary['steps']}: run the same command again to resume", flush=True)
    if "stopped_by_signal" in summary:
        sys.exit(128 + signal.Signals[summary["stopped_by_signal"]].value)


def main() -> None:
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    overrides = sys.argv[1:]
    if not any(a.startswith("-") for a in overrides):
        # Before Hydra creates run_dir: a bad value or source is one line and leaves nothing behind.
        try:
            checked = validate(config.compose(overrides, config_name="finetune"), weights=False)[0]
            sys.argv += claim_run_dir(checked.run.run_dir, overrides)
        except (ValueError, FileNotFoundError, ConvertError, RunDirBusy) as err:
            print(f"adamae-finetune: error: {err}", file=sys.stderr)
            sys.exit(2)
    config.register()
    _hydra_main()


__all__ = ["final_evaluation", "main", "run", "validate"]
