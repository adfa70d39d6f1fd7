"""Hydra composition of the packaged ``configs/`` outside ``@hydra.main``: what the entry points check before
Hydra creates ``run_dir``, and what tools and tests compose."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast


def compose(overrides: Sequence[str], config_name: str = "config") -> dict[str, Any]:
    """The resolved config for ``overrides`` (Hydra's override grammar), composed from the packaged ``configs/``
    exactly as ``adamae-pretrain`` (``config``) or ``adamae-finetune`` (``finetune``) composes it; a bad override
    is a one-line ``ValueError``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("adamae_scale.configs", version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(one_line(str(err))) from err


def one_line(hydra_message: str) -> str:
    """Hydra's first line, plus the options it lists below it for an unknown group choice (``engine=foo``)."""
    lines = hydra_message.splitlines()
    options: list[str] = []
    for line in lines[1:]:
        if line.startswith("Available options"):
            options = []
        elif line.startswith("\t") and line.strip() and not line.strip().startswith(("_", "provider=")):
            options.append(line.strip())
        elif options:
            break
    return f"{lines[0]} (available: {', '.join(options)})" if options else lines[0]
