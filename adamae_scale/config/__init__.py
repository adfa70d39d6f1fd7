"""The run configuration, typed: frozen dataclasses per Hydra group, built and checked once, before any process
group, model or file exists.

Hydra composes the YAML files under ``configs/`` with the command line's overrides, as before; the resolved
mapping becomes a ``PretrainConfig`` or ``FinetuneConfig`` (``load_pretrain``/``load_finetune``), whose
sections are frozen dataclasses that check their values when built (``checks``: every one-line error naming
a field lives there). Everything below the entry points takes these objects, not dicts.

Adding a key is a one-place change, plus the YAML line that gives its default and documents it:

- a key of a group section (``train``, ``masking``, ``finetune``, ``eval``, ``engine``, ``loss``, ``clip``):
  a field of that section's dataclass in ``config/sections.py`` (its check, if any, in ``__post_init__``);
- a ``data`` key: a field of ``SyntheticData`` or ``ShardData`` in ``data/sections.py``;
- a ``model`` key: a field of ``AdaMAEConfig`` (``models/adamae.py``), which is saved with every checkpoint;
- a new group choice (``data=...``, a ``+preset=...`` file of overrides): a YAML file only, if it sets keys
  that exist.

A key in a YAML file or on the command line that no dataclass has is refused in one line naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .checks import check_resume, model_config
from .compose import compose
from .run import FinetuneConfig, ModelSection, PretrainConfig, RunSection
from .sections import (
    ClipSection,
    EngineSection,
    FinetuneSection,
    FocusEvalSection,
    LossSection,
    MaskingSection,
    TrainSection,
    ViewsEvalSection,
)
from .store import register


def load_pretrain(cfg: Mapping[str, Any] | Sequence[str]) -> PretrainConfig:
    """The checked pre-training config from Hydra's resolved mapping, or from overrides to compose."""
    return PretrainConfig.from_config(cfg if isinstance(cfg, Mapping) else compose(cfg))


def load_finetune(cfg: Mapping[str, Any] | Sequence[str]) -> FinetuneConfig:
    """The checked fine-tuning config (the source is read later, ``finetune.run.validate``)."""
    return FinetuneConfig.from_config(cfg if isinstance(cfg, Mapping) else compose(cfg, config_name="finetune"))


__all__ = [
    "ClipSection",
    "EngineSection",
    "FinetuneConfig",
    "FinetuneSection",
    "FocusEvalSection",
    "LossSection",
    "MaskingSection",
    "ModelSection",
    "PretrainConfig",
    "RunSection",
    "TrainSection",
    "ViewsEvalSection",
    "check_resume",
    "compose",
    "load_finetune",
    "load_pretrain",
    "model_config",
    "register",
]
