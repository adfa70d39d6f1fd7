"""What a fine-tuning run (or a probe sweep) writes: the classifier folder (``RUN_DIR/model``, ``model_ema``) with
its head's description, and the evaluation files (``eval.json``, ``predictions.jsonl``, ``confusion_matrix.png``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_output_dir, atomic_write_text
from ..config import FinetuneConfig
from ..convert.folder import FORMAT_CLASSIFIER, FORMAT_VERSION, write_folder
from ..engine import setup
from ..engine.interface import TrainingEngine
from ..models import AdaMAEConfig
from ..models.pooler import AttentiveSpec
from .confusion_png import write_confusion


def attentive_spec(cfg: FinetuneConfig, model_cfg: AdaMAEConfig) -> AttentiveSpec | None:
    """``finetune.mode=attentive``: the pooler's queries and heads (``None`` for the other modes)."""
    tune = cfg.finetune
    if tune.mode != "attentive":
        return None
    heads = tune.pooler_heads if tune.pooler_heads is not None else model_cfg.num_heads
    if model_cfg.embed_dim % heads:
        raise ValueError(
            f"finetune.pooler_heads={heads!r}: expected an integer >= 1 dividing the encoder's width "
            f"{model_cfg.embed_dim} (null: the encoder's {model_cfg.num_heads})"
        )
    return AttentiveSpec(tune.pooler_queries, heads)


@dataclass(frozen=True)
class ClassifierHead:
    """What a classifier folder records besides the encoder: the classes, their names, the pooling."""

    classes: int
    names: list[str]
    attentive: AttentiveSpec | None = None


def save_classifier(
    engine: TrainingEngine, model_cfg: AdaMAEConfig, head: ClassifierHead, out_dir: Path, env: setup.DistEnv
) -> None:
    """The trained classifier as a weight folder (``format: adamae-classifier``, fp32), written atomically by
    rank 0 (under ZeRO-3 every rank takes part in gathering each parameter)."""
    import deepspeed

    state = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if env.rank == 0:
                state[name] = param.detach().float().cpu().clone()
    if env.rank == 0:
        write_classifier(state, model_cfg, head, out_dir)


def write_classifier(
    state: dict[str, torch.Tensor],
    model_cfg: AdaMAEConfig,
    head: ClassifierHead,
    out_dir: Path,
    ema_decay: float | None = None,
) -> None:
    """``state`` as a classifier weight folder (``RUN_DIR/model``, or ``RUN_DIR/model_ema`` for the average)."""
    source: dict[str, Any] = {"kind": "adamae-finetune", "run_dir": str(out_dir.parent.absolute())}
    if ema_decay is not None:
        source["model_ema_decay"] = ema_decay
    config = {
        "format": FORMAT_CLASSIFIER,
        "format_version": FORMAT_VERSION,
        "model": model_cfg.to_dict(),
        "num_classes": head.classes,
        "class_names": head.names,
        **({"attentive": head.attentive.to_dict()} if head.attentive is not None else {}),
        "source": source,
    }
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        write_folder(tmp, state, config, torch.float32)


def write_evaluation(
    run_dir: Path,
    metrics: Mapping[str, Any],
    rows: list[dict[str, Any]],
    skipped: list[str],
    ema_rows: list[dict[str, Any]] | None = None,
) -> None:
    """``eval.json``, ``predictions.jsonl`` (and ``predictions_ema.jsonl``), ``confusion_matrix.png``."""
    atomic_write_text(run_dir / "eval.json", json.dumps({**metrics, "skipped_videos": skipped[:100]}, indent=2))
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if ema_rows is not None:
        atomic_write_text(run_dir / "predictions_ema.jsonl", "".join(json.dumps(r) + "\n" for r in ema_rows))
    matrix = metrics["confusion_matrix"]
    title = f"top-1 {metrics['top1']:.3f} over {metrics['videos']} videos"
    write_confusion(run_dir / "confusion_matrix.png", matrix["counts"], matrix["class_names"], title)
