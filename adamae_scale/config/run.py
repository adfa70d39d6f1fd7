"""The two run configs, ``PretrainConfig`` (``adamae-pretrain``, ``configs/config.yaml``) and ``FinetuneConfig``
(``adamae-finetune``, ``configs/finetune.yaml``), built from Hydra's resolved config and checked once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data import SECTIONS, DataSection, check_repeated_aug
from ..engine import setup
from ..engine.engines import EngineSpec
from ..models import AdaMAEConfig
from ..models.registry import ENGINE_KEYS
from . import checks
from .sections import (
    ClipSection,
    EngineSection,
    FinetuneSection,
    FocusEvalSection,
    LossSection,
    MaskingSection,
    TrainSection,
    ViewsEvalSection,
    build,
)


@dataclass(frozen=True)
class ModelSection:
    """``configs/model/*.yaml`` + the masking section: the network (``arch``, saved with every checkpoint) and
    how the engine runs it (activation checkpointing)."""

    arch: AdaMAEConfig
    checkpoint_every: int = 0
    checkpoint_offload: bool = False

    @classmethod
    def from_config(cls, model: Mapping[str, Any], masking: Mapping[str, Any] | None) -> ModelSection:
        arch = checks.model_config(model, masking)
        return cls(arch, model.get("checkpoint_every", 0), model.get("checkpoint_offload", False))


def data_section(values: Any) -> DataSection:
    name = values.get("name") if isinstance(values, Mapping) else None
    checks.one_of("data", name, tuple(SECTIONS))
    return build(SECTIONS[str(name)], values, "data")


@dataclass(frozen=True)
class RunSection:
    """The keys every run has at the top level (``run_dir``, ``precision``, ``ds``, ``seed``), checked."""

    run_dir: Path
    precision: str
    ds: str
    seed: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunSection:
        checks.one_of("precision", cfg["precision"], setup.PRECISIONS)
        checks.number("seed", cfg["seed"], None, integer=True)
        checks.check_ds(cfg["ds"])
        return cls(checks.check_run_dir(cfg["run_dir"]), cfg["precision"], str(cfg["ds"]), cfg["seed"])


@dataclass(frozen=True)
class PretrainConfig:
    """``adamae-pretrain``'s config: model, masking, data, train, engine, loss, eval and the run's own keys."""

    model: ModelSection
    masking: MaskingSection
    data: DataSection
    train: TrainSection
    engine: EngineSection
    loss: LossSection
    eval: FocusEvalSection
    run: RunSection

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PretrainConfig:
        """Build and check every section (one-line ``ValueError`` naming the first bad field)."""
        model = ModelSection.from_config(cfg["model"], cfg["masking"])
        data = data_section(cfg["data"])
        checks.check_data(data, model.arch)
        train = build(TrainSection, cfg["train"], "train")
        check_repeated_aug("data.repeated_aug", data.repeated_aug, train.micro_batch_size)
        run = RunSection.from_config(cfg)
        masking = build(MaskingSection, cfg["masking"], "masking")
        loss = build(LossSection, cfg["loss"], "loss")
        focus = build(FocusEvalSection, cfg.get("eval", {}), "eval")
        engine = build(EngineSection, _engine_values(cfg), "engine")
        checks.check_engine(engine.name, engine.sharding, run.ds, model.checkpoint_every, model.checkpoint_offload)
        return cls(model, masking, data, train, engine, loss, focus, run)

    def with_ds(self, ds: str) -> PretrainConfig:
        """This config with the stage ``ds=auto`` resolved to."""
        return replace(self, run=replace(self.run, ds=ds))

    def engine_spec(self, ds: str | None = None) -> EngineSpec:
        """What the engine needs (``ds``: the stage ``ds=auto`` resolved to)."""
        return _engine_spec(self.train, self.engine, self.run.precision, ds or self.run.ds)


@dataclass(frozen=True)
class FinetuneConfig:
    """``adamae-finetune``'s config. ``model`` (a size section, only with ``init=none``) is kept as given: the
    architecture comes from the source (``finetune.sources``), checked when it is read."""

    init: str
    num_classes: int | None
    clip: ClipSection
    model: Mapping[str, Any] | None
    data: DataSection
    train: TrainSection
    finetune: FinetuneSection
    eval: ViewsEvalSection
    eval_only: bool
    run: RunSection
    engine: EngineSection = EngineSection()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FinetuneConfig:
        train = build(TrainSection, cfg["train"], "train")
        run = RunSection.from_config(cfg)
        tune = build(FinetuneSection, cfg["finetune"], "finetune")
        if tune.mixing and train.micro_batch_size % 2:
            raise ValueError(
                f"train.micro_batch_size={train.micro_batch_size}: mixup/cutmix pair each clip with another "
                "of the micro-batch, so it must be even (or set finetune.mixup=0 finetune.cutmix=0)"
            )
        views = build(ViewsEvalSection, cfg["eval"], "eval")
        if cfg.get("num_classes") is not None:
            checks.number("num_classes", cfg["num_classes"], 2, integer=True)
        data = data_section(cfg["data"])
        if data.repeated_aug != 1:
            raise ValueError(
                f"data.repeated_aug={data.repeated_aug!r}: fine-tuning repeats clips by finetune.repeated_aug"
            )
        # The linear probe has no augmentation to repeat: any micro-batch then.
        micro = train.micro_batch_size if tune.full else None
        check_repeated_aug("finetune.repeated_aug", tune.repeated_aug, micro)
        config = cls(
            init=str(cfg["init"]),
            num_classes=cfg.get("num_classes"),
            clip=build(ClipSection, cfg.get("clip") or {}, "clip"),
            model=dict(cfg["model"]) if cfg.get("model") else None,
            data=data,
            train=train,
            finetune=tune,
            eval=views,
            eval_only=bool(cfg.get("eval_only", False)),
            run=run,
        )
        config.check_stage(run.ds)
        return config

    def check_stage(self, ds: str) -> None:
        """The model EMA needs whole weights on every rank: not under ZeRO-3 (checked again once ``auto`` chose)."""
        if self.finetune.model_ema and checks.ds_stage(ds) == 3:
            raise ValueError(
                f"finetune.model_ema=true needs the full weights on every rank, which ds={ds} (ZeRO-3) partitions: "
                "use ds=zero2 or finetune.model_ema=false"
            )

    def with_ds(self, ds: str) -> FinetuneConfig:
        return replace(self, run=replace(self.run, ds=ds))

    def engine_spec(self, ds: str | None = None) -> EngineSpec:
        return _engine_spec(self.train, self.engine, self.run.precision, ds or self.run.ds)


def _engine_values(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    engine = cfg.get("engine") or {}
    return engine if isinstance(engine, Mapping) else {"name": str(engine)}


def _engine_spec(train: TrainSection, engine: EngineSection, precision: str, ds: str) -> EngineSpec:
    return EngineSpec(
        micro_batch_size=train.micro_batch_size,
        accumulation=train.accumulation,
        clip_grad=train.clip_grad,
        precision=precision,
        name=engine.name,
        ds=ds,
        sharding=engine.sharding,
    )


__all__ = ["ENGINE_KEYS", "FinetuneConfig", "ModelSection", "PretrainConfig", "RunSection", "data_section"]
