"""Model sizes: the Hydra files under ``configs/model/`` are the single source of the size table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from .adamae import AdaMAE, AdaMAEConfig

# Keys of a model config that configure how the engine runs the model, not the network itself.
ENGINE_KEYS = ("checkpoint_every", "checkpoint_offload")
# Keys of the masking section that shape the network's forward (saved in config.json under the same names).
MASKING_MODEL_KEYS = ("decoder_ratio", "decoder_mask")


def config_dir():
    return resources.files("adamae_scale.configs")


def model_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in config_dir().joinpath("model").iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
    )


def _load_model_yaml(name: str) -> dict[str, Any]:
    folder = config_dir().joinpath("model")
    path = folder.joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}: expected one of {model_names()}")
    node = OmegaConf.create(path.read_text())
    merged: DictConfig | ListConfig = OmegaConf.create()
    for parent in node.pop("defaults", []):
        merged = OmegaConf.merge(merged, OmegaConf.create(folder.joinpath(f"{parent}.yaml").read_text()))
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.merge(merged, node), resolve=True))


def make_config(model: Mapping[str, Any], masking: Mapping[str, Any] | None = None) -> AdaMAEConfig:
    """An ``AdaMAEConfig`` from a ``model`` config section (+ optional ``masking`` section)."""
    known = {f.name for f in fields(AdaMAEConfig)}
    values = {k: v for k, v in dict(model).items() if k not in ENGINE_KEYS}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config has unknown keys {unknown}; expected some of {sorted(known)}")
    if masking is not None:
        values["masking"] = masking["strategy"]
        values["mask_ratio"] = masking["ratio"]
        for key in MASKING_MODEL_KEYS:
            if key in masking:
                values[key] = masking[key]
    return AdaMAEConfig(**values)


def config_for(name: str, **overrides: Any) -> AdaMAEConfig:
    """The named size from ``configs/model/NAME.yaml``, with keyword overrides."""
    values = _load_model_yaml(name)
    values.update(overrides)
    return make_config(values)


def build_model(cfg: AdaMAEConfig) -> AdaMAE:
    return AdaMAE(cfg)
