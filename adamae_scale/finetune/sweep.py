"""``finetune.lr_sweep``: probe heads for several learning rates (× weight decays) trained together on cached
features, each evaluated on the held-out set, the best kept (as V-JEPA's frozen evaluation does).

One process: encode the training clips and the held-out videos' views once (``features.FeatureCache``), then
train one ``ProbeHead`` per setting on the same micro-batches for ``train.steps`` steps. Every head is built from
the same seed (the same initial weights), has its own AdamW and its own loss and backward pass, so a head's
result does not depend on the others in the sweep: trained alone, it ends bit for bit the same. The lr of a
setting is scaled by the batch like ``train.base_lr`` (``× micro_batch_size / 256``), warmed up over
``train.warmup_fraction`` and decayed by a half-cosine to ``lr × train.min_lr / train.base_lr``.

Writes ``RUN_DIR/sweep.json`` (each setting's multi-view top-1, top-5 and mean class accuracy, the best, the
cache's size per view), and for the best head the same outputs as a fine-tuning run: ``RUN_DIR/model`` (encoder
and head, an ``adamae-classifier`` folder), ``eval.json``, ``predictions.jsonl``, ``confusion_matrix.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import param_groups_weight_decay

from ..base.atomic import atomic_write_text
from ..config import FinetuneConfig
from ..data import ShardData, build_data
from ..engine import optim, setup
from ..metrics import MetricsLogger
from ..models import AdaMAEConfig
from ..models.classifier import ProbeHead, VideoClassifier
from . import evaluate
from .features import FeatureCache, Split, file_identity, fill_train, fill_val
from .labels import class_names
from .outputs import ClassifierHead, attentive_spec, write_classifier, write_evaluation
from .recipe import PROBE_MODES
from .sources import EncoderSource, classifier_state
from .views import rank_views


@dataclass(frozen=True)
class HeadSetting:
    base_lr: float
    weight_decay: float


def sweep_settings(cfg: FinetuneConfig) -> list[HeadSetting]:
    """The grid ``finetune.lr_sweep × finetune.wd_sweep`` (one-line errors naming the field)."""
    tune = cfg.finetune
    lrs, wds = tune.lr_sweep, tune.wd_sweep
    if tune.mode not in PROBE_MODES:
        raise ValueError(
            f"finetune.lr_sweep needs a frozen encoder: finetune.mode={tune.mode!r}, expected linear or attentive"
        )
    if not isinstance(lrs, Sequence) or isinstance(lrs, str) or not lrs:
        raise ValueError(f"finetune.lr_sweep={lrs!r}: expected a non-empty list of base learning rates")
    wds = (cfg.train.weight_decay,) if wds is None else wds
    if not isinstance(wds, Sequence) or isinstance(wds, str) or not wds:
        raise ValueError(f"finetune.wd_sweep={wds!r}: expected a non-empty list of weight decays (or null)")
    for name, values in (("lr_sweep", lrs), ("wd_sweep", wds)):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"finetune.{name}: {value!r} is not a number >= 0")
    if tune.head_dropout > 0:
        raise ValueError("finetune.lr_sweep trains heads side by side: set finetune.head_dropout=0")
    clips = tune.cache_clips
    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 1:
        raise ValueError(f"finetune.cache_clips={clips!r}: expected an integer >= 1")
    return [HeadSetting(float(lr), float(wd)) for lr in lrs for wd in wds]


def train_heads(
    train: Split,
    settings: Sequence[HeadSetting],
    make_head: Callable[[], ProbeHead],
    cfg: FinetuneConfig,
    logger: MetricsLogger | None = None,
) -> list[ProbeHead]:
    """One head per setting, trained side by side on the same micro-batches of ``train``'s features."""
    steps, batch = cfg.train.steps, cfg.train.micro_batch_size
    base, floor = cfg.train.base_lr, cfg.train.min_lr
    warmup = round(cfg.train.warmup_fraction * steps)
    smoothing = cfg.finetune.label_smoothing
    criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else F.cross_entropy
    heads, optimizers = [], []
    for setting in settings:
        torch.manual_seed(cfg.run.seed)  # the same initial head whatever its place in the sweep
        head = make_head()
        heads.append(head)
        groups = param_groups_weight_decay(head, weight_decay=setting.weight_decay)
        beta1, beta2 = (float(b) for b in cfg.train.betas)
        optimizers.append(torch.optim.AdamW(groups, lr=0.0, betas=(beta1, beta2), eps=cfg.train.eps, foreach=False))
    order = torch.Generator().manual_seed(cfg.run.seed + 1)
    count = len(train.labels)
    permutation, cursor = torch.randperm(count, generator=order), 0
    for step in range(steps):
        if cursor + batch > count:  # a new epoch: a new order (a last partial batch is left out)
            permutation, cursor = torch.randperm(count, generator=order), 0
        picked = permutation[cursor : cursor + batch]
        cursor += batch
        x, y = train.features[picked].float(), train.labels[picked]
        losses = {}
        for i, (setting, head, optimizer) in enumerate(zip(settings, heads, optimizers, strict=True)):
            peak = optim.scaled_lr(setting.base_lr, batch)
            lr = optim.lr_at(step, peak, peak * floor / base if base else 0.0, warmup, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(head(x), y)
            loss.backward()
            optimizer.step()
            losses[f"loss_{i}"] = float(loss.detach())
        if logger is not None and (step + 1) % cfg.train.log_every == 0:
            logger.log(step + 1, losses)
    return heads


@torch.no_grad()
def evaluate_head(head: ProbeHead, val: Split, classes: int, names: list[str]) -> tuple[dict[str, Any], list[dict]]:
    """Multi-view test on cached views: softmax averaged over each video's views."""
    head.eval()
    views = val.features.shape[1]
    flat = val.features.flatten(0, 1)  # (videos × views, ...)
    logits = torch.cat([head(part.float()) for part in flat.split(1024)])  # (videos × views, K)
    probs = evaluate.average_views(logits, views)
    predictions = [
        evaluate.Prediction(index, key, int(label), p, source)
        for index, key, label, p, source in zip(val.index, val.keys, val.labels, probs, val.sources, strict=True)
    ]
    return evaluate.summarize(predictions, classes, names)


def cache_identity(cfg: FinetuneConfig, source: EncoderSource, model_cfg: AdaMAEConfig) -> dict[str, Any]:
    """Everything the cached features depend on."""
    init = cfg.init
    weights: Any = None
    path = Path(str(init))
    if path.is_dir():
        weights = file_identity(path / "model.safetensors")
    elif path.is_file():
        weights = file_identity(path)
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("workers", "prefetch")}
    return {
        "init": str(init),
        "weights": weights,
        "seed": cfg.run.seed if weights is None else None,  # a random encoder: its seed
        "model": model_cfg.to_dict(),
        "mode": cfg.finetune.mode,
        "attentive": [cfg.finetune.pooler_queries, cfg.finetune.pooler_heads]
        if cfg.finetune.mode == "attentive"
        else None,
        "data": {"kind": type(cfg.data).__name__, **json.loads(json.dumps(data, default=str))},
        "clips": cfg.finetune.cache_clips,
        "eval": [cfg.eval.temporal_views, cfg.eval.spatial_views, cfg.eval.videos],
        "precision": cfg.run.precision,
    }


def run_sweep(cfg: FinetuneConfig, source: EncoderSource, model_cfg: AdaMAEConfig, classes: int) -> dict[str, Any]:
    settings = sweep_settings(cfg)
    env = setup.dist_env()
    if env.world_size > 1:
        raise ValueError(f"finetune.lr_sweep runs in one process; launched with world size {env.world_size}")
    started = time.perf_counter()
    tune, run_dir = cfg.finetune, Path(cfg.run.run_dir)
    names = class_names(cfg.data, classes)
    attentive = attentive_spec(cfg, model_cfg)
    torch.manual_seed(cfg.run.seed)
    model = VideoClassifier(model_cfg, classes, tune.head_init_scale, 0.0, attentive)
    state, report = classifier_state(source, {name: p.shape for name, p in model.named_parameters()})
    model.load_state_dict(state, strict=False)
    model.eval().requires_grad_(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # encode on the accelerator if any
    model.to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[adamae] finetune ({tune.mode}, sweep of {len(settings)} heads on cached features) {model_cfg.name}: "
        f"{classes} classes\n[adamae] {report.summary()}",
        flush=True,
    )
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32

    def encode(video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model.probe_input(video.to(device)).cpu()

    cache = FeatureCache(Path(tune.cache_dir or run_dir / "features"), cache_identity(cfg, source, model_cfg))
    micro = cfg.eval.micro_batch_size
    train_data = dataclasses.replace(cfg.data, repeated_aug=1)
    if isinstance(train_data, ShardData):
        train_data = dataclasses.replace(train_data, rand_augment=None)
    fill_train(cache, encode, lambda: build_data(train_data, model_cfg, micro, 0, 1), tune.cache_clips, dtype, print)
    views = cfg.eval.temporal_views * cfg.eval.spatial_views
    fill_val(
        cache,
        encode,
        lambda done, skipped: rank_views(cfg, model_cfg, env, skipped, done),
        views,
        micro,
        dtype,
        print,
    )
    encoded = time.perf_counter()
    train, val = cache.load("train"), cache.load("val")
    logger = MetricsLogger(run_dir, enabled=True)

    def make_head() -> ProbeHead:
        head = ProbeHead(model_cfg.embed_dim, classes, tune.head_init_scale, 0.0, attentive)
        head.fc_norm.load_state_dict(model.fc_norm.state_dict())  # the source's, as the engine's probe starts
        head.fc_norm.requires_grad_(tune.mode == "attentive")  # the linear probe keeps it frozen
        return head

    heads = train_heads(train, settings, make_head, cfg, logger)
    logger.close()
    results = [evaluate_head(head, val, classes, names) for head in heads]
    table = [
        {
            "base_lr": setting.base_lr,
            "lr": optim.scaled_lr(setting.base_lr, cfg.train.micro_batch_size),
            "weight_decay": setting.weight_decay,
            **{k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy")},
        }
        for setting, (metrics, _) in zip(settings, results, strict=True)
    ]
    best = max(range(len(table)), key=lambda i: (table[i]["top1"], table[i]["mean_class_accuracy"], -i))
    skipped = cache.split_state("val").get("skipped", [])
    metrics, rows = results[best]
    metrics = {
        **metrics,
        "temporal_views": cfg.eval.temporal_views,
        "spatial_views": cfg.eval.spatial_views,
    }
    metrics.update(skipped=len(skipped), sweep_best=table[best])
    sweep = {
        "heads": table,
        "best": best,
        "train_clips": len(train.labels),
        "videos": len(val.labels),
        "views_per_video": views,
        "feature_shape": list(train.features.shape[1:]),
        "feature_dtype": str(train.features.dtype).removeprefix("torch."),
        "cache_dir": str(cache.root),
        "cache_bytes_per_view": {
            "train": round(cache.bytes_per_view("train"), 1),
            "val": round(cache.bytes_per_view("val"), 1),
        },
        "seconds": {"encode": round(encoded - started, 1), "heads": round(time.perf_counter() - encoded, 1)},
    }
    atomic_write_text(run_dir / "sweep.json", json.dumps(sweep, indent=2))
    head_state = {f"{name}": t.detach().float().clone() for name, t in heads[best].state_dict().items()}
    full = {name: t.detach().float().cpu().clone() for name, t in model.state_dict().items()}
    full.update(head_state)
    write_classifier(full, model_cfg, ClassifierHead(classes, names, attentive), run_dir / "model")
    write_evaluation(run_dir, metrics, rows, skipped)
    for row in table:
        print(
            f"[adamae] sweep: base lr {row['base_lr']:g} (lr {row['lr']:.3g}), weight decay {row['weight_decay']:g}: "
            f"top-1 {row['top1']:.3f}",
            flush=True,
        )
    summary = {"run_dir": str(run_dir), "steps": cfg.train.steps, "eval": metrics, "sweep": sweep}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["HeadSetting", "evaluate_head", "run_sweep", "sweep_settings", "train_heads"]
