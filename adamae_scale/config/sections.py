"""The typed sections of a run config: one frozen dataclass per Hydra group (``configs/<group>/*.yaml``) or
top-level section. A field is a key, with the YAML's meaning; building a section checks its values
(``__post_init__``, through ``checks``), so a section that exists is a valid one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from ..engine.fairscale_engine import DEFAULT_SHARDING
from ..engine.optim import Schedule
from ..models import AdaMAEConfig
from . import checks

T = TypeVar("T")

# (key, minimum, integer?) for the train section.
_TRAIN_NUMBERS: tuple[tuple[str, float, bool], ...] = (
    ("steps", 1, True),
    ("micro_batch_size", 1, True),
    ("accumulation", 1, True),
    ("log_every", 1, True),
    ("ckpt_every", 0, True),
    ("keep_last", 0, True),
    ("max_skipped_in_a_row", 1, True),
    ("base_lr", 0.0, False),
    ("min_lr", 0.0, False),
    ("weight_decay", 0.0, False),
    ("eps", 0.0, False),
    ("clip_grad", 0.0, False),
)


def build(cls: type[T], values: Any, prefix: str) -> T:
    """The section ``cls`` from a config mapping: every key must be a field (a one-line error names the first
    one that is not), absent keys take the field's default, lists become tuples."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix}={values!r}: expected a section of keys")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown key (expected one of {names})")
    missing = [
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{prefix}.{missing[0]}: missing (the config must set it)")
    return cls(**{key: frozen(value) for key, value in values.items()})


def frozen(value: Any) -> Any:
    """Lists as tuples (all the way down), so that a section is immutable and hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class MaskingSection:
    """``configs/masking/*.yaml``."""

    strategy: str
    ratio: float
    sampling_loss_weight: float = 0.0
    # Decoder masking: checked and defaulted by the model's config, which carries both keys into checkpoints.
    decoder_ratio: float = AdaMAEConfig.decoder_ratio
    decoder_mask: str = AdaMAEConfig.decoder_mask

    def __post_init__(self) -> None:
        checks.number("masking.sampling_loss_weight", self.sampling_loss_weight, 0.0)


@dataclass(frozen=True)
class TrainSection:
    """``configs/train/*.yaml``: the optimisation and the run's length, logging and checkpoints."""

    steps: int
    micro_batch_size: int
    base_lr: float
    min_lr: float
    warmup_fraction: float
    betas: tuple[float, float]
    accumulation: int = 1
    weight_decay: float = 0.05
    eps: float = 1e-8
    clip_grad: float = 0.0
    log_every: int = 1
    ckpt_every: int = 500
    resume: str | None = "auto"
    stop_after: int | None = None
    keep_last: int = 0
    constant_lr_params: tuple[str, ...] = ()
    max_skipped_in_a_row: int = 3
    loss_spike_factor: float | None = None
    image_every: int | None = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for key, minimum, integer in _TRAIN_NUMBERS:
            checks.number(f"train.{key}", getattr(self, key), minimum, integer=integer)
        warmup = checks.number("train.warmup_fraction", self.warmup_fraction, 0.0)
        if warmup > 1.0:
            raise ValueError(f"train.warmup_fraction={warmup}: expected a share of the steps in [0, 1]")
        betas = self.betas
        if (
            not isinstance(betas, (list, tuple))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(
                f"train.betas={list(betas) if isinstance(betas, tuple) else betas!r}: expected two numbers in [0, 1)"
            )
        if self.stop_after is not None:
            checks.number("train.stop_after", self.stop_after, 1, integer=True)
        if self.image_every is not None:
            checks.number("train.image_every", self.image_every, 0, integer=True)
        checks.boolean("train.compile", self.compile)
        spike = self.loss_spike_factor
        if spike is not None and checks.number("train.loss_spike_factor", spike, 0.0) <= 1.0:
            raise ValueError(f"train.loss_spike_factor={spike}: expected a factor > 1 (or null to turn the rule off)")
        prefixes = self.constant_lr_params
        if not isinstance(prefixes, (list, tuple)) or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"train.constant_lr_params={prefixes!r}: expected a list of parameter-name prefixes")
        checks.check_resume(self.resume)

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step: ``micro_batch_size × accumulation × world_size``."""
        return self.micro_batch_size * self.accumulation * world_size

    def schedule(self, lr_batch: int) -> Schedule:
        """The lr schedule, ``base_lr``/``min_lr`` scaled by ``lr_batch`` (the global batch, in clips)."""
        return Schedule.scaled(self.base_lr, self.min_lr, lr_batch, self.warmup_fraction, self.steps)


@dataclass(frozen=True)
class EngineSection:
    """``configs/engine/*.yaml``: DeepSpeed (its stage is the top-level ``ds``) or fairscale (``sharding``)."""

    name: str = "deepspeed"
    sharding: str = DEFAULT_SHARDING


@dataclass(frozen=True)
class LossSection:
    target: str = "norm_pix"

    def __post_init__(self) -> None:
        checks.one_of("loss.target", self.target, checks.LOSS_TARGETS)


@dataclass(frozen=True)
class FocusEvalSection:
    """Pre-training's ``eval``: the end-of-run focus report and pictures (synthetic data)."""

    focus_batches: int = 0
    pictures: int = 0

    def __post_init__(self) -> None:
        checks.number("eval.focus_batches", self.focus_batches, 0, integer=True)
        checks.number("eval.pictures", self.pictures, 0, integer=True)


@dataclass(frozen=True)
class FinetuneSection:
    """``configs/finetune.yaml``'s ``finetune``: the recipe (layer decay, regularisation, augmentation, EMA)."""

    mode: str = "full"
    layer_decay: float = 0.75
    drop_path: float = 0.1
    head_init_scale: float = 0.001
    head_dropout: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    checkpoint_every: int = 0
    rand_augment: str | None = None
    random_erasing: float = 0.25
    repeated_aug: int = 2
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    pooler_queries: int = 1  # attentive: learned queries of the pooler
    pooler_heads: int | None = None  # attentive: its heads (None: the encoder's)
    lr_sweep: tuple[float, ...] | None = None  # a sweep of probe heads on cached features (finetune/sweep.py)
    wd_sweep: tuple[float, ...] | None = None
    cache_dir: str | None = None
    cache_clips: int = 1024

    def __post_init__(self) -> None:
        checks.one_of("finetune.mode", self.mode, checks.FINETUNE_MODES)
        checks.number("finetune.pooler_queries", self.pooler_queries, 1, integer=True)
        if self.pooler_heads is not None:
            checks.number("finetune.pooler_heads", self.pooler_heads, 1, integer=True)
        checks.number("finetune.cache_clips", self.cache_clips, 1, integer=True)
        checks.check_rand_augment("finetune.rand_augment", self.rand_augment)
        for key in ("drop_path", "head_dropout", "label_smoothing", "mixup_switch_prob", "random_erasing"):
            checks.share(f"finetune.{key}", getattr(self, key))
        for key in ("layer_decay", "head_init_scale", "mixup", "cutmix"):
            checks.number(f"finetune.{key}", getattr(self, key), 0.0)
        checks.number("finetune.checkpoint_every", self.checkpoint_every, 0, integer=True)
        checks.boolean("finetune.model_ema", self.model_ema)
        decay = self.model_ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"finetune.model_ema_decay={decay!r}: expected a number in [0, 1)")

    @property
    def full(self) -> bool:
        return self.mode == "full"

    @property
    def views_per_clip(self) -> int:
        """Views per decoded clip: ``repeated_aug`` (the linear probe has no augmentation to repeat: 1)."""
        return self.repeated_aug if self.full else 1

    @property
    def mixing(self) -> bool:
        return self.full and (self.mixup > 0 or self.cutmix > 0)

    @property
    def encoder_drop_path(self) -> float:
        """Stochastic depth in the encoder: ``drop_path`` when it trains; 0 for a frozen one (a probe's features
        are the same in training and at test)."""
        return self.drop_path if self.full else 0.0


@dataclass(frozen=True)
class ViewsEvalSection:
    """Fine-tuning's ``eval``: periodic single-view top-1 and the final multi-view test."""

    every: int = 0
    batches: int = 4
    temporal_views: int = 2
    spatial_views: int = 3
    videos: int = 64
    micro_batch_size: int = 8

    def __post_init__(self) -> None:
        for key in ("temporal_views", "spatial_views", "videos", "micro_batch_size", "batches"):
            checks.number(f"eval.{key}", getattr(self, key), 1, integer=True)
        checks.number("eval.every", self.every, 0, integer=True)


@dataclass(frozen=True)
class ClipSection:
    """Fine-tuning's ``clip``: another clip geometry than the source's (null: the source's)."""

    num_frames: int | None = None
    img_size: Any = None  # an int, [height, width] or null
