"""The typed sections in Hydra's ConfigStore, as ``schema/<group>`` entries: what each group accepts, for
tools (``OmegaConf.structured``) and for readers. Composition stays with the YAML files and the CLI keys."""

from __future__ import annotations

from ..data import ShardData, SyntheticData
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

SCHEMAS: dict[str, type] = {
    "masking": MaskingSection,
    "data/synthetic": SyntheticData,
    "data/shards": ShardData,
    "train": TrainSection,
    "engine": EngineSection,
    "loss": LossSection,
    "eval/pretrain": FocusEvalSection,
    "eval/finetune": ViewsEvalSection,
    "finetune": FinetuneSection,
    "clip": ClipSection,
}


def register() -> None:
    """Store every section's schema (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        group, _, option = name.rpartition("/")
        store.store(group=f"schema/{group}" if group else "schema", name=option or name, node=node)
