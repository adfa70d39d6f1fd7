"""The names tools and tests have used for the pre-training checks; the checks live in ``adamae_scale.config``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import check_resume, compose, load_pretrain, model_config
from .models import AdaMAEConfig


def validate(cfg: Mapping[str, Any]) -> AdaMAEConfig:
    """Every check that can fail before a process group or a model exists; returns the model config."""
    return load_pretrain(cfg).model.arch


__all__ = ["check_resume", "compose", "model_config", "validate"]
