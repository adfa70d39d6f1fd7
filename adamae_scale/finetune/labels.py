"""Class names: where a fine-tuning run's label indices get their names.

- ``data=synthetic`` (``data.label_task=motion``): the motion classes, ``horizontal-slow`` ...;
- ``data=shards``: the label map ``adamae-shards`` keeps in the shards' ``manifest.json`` (from the class
  folders, an annotation file or ``--label-map``); the validation shards must number classes the same way;
- anything else (``num_classes=K`` with unnamed labels): ``class_0`` ... ``class_{K-1}``.

The names travel with the run: the checkpoints' ``config.json``, the classifier folder's ``config.json``
(``class_names``), ``predictions.jsonl``, ``eval.json`` and the transformers export's ``id2label``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..convert.folder import folder_class_names
from ..data import DataSection, SyntheticData
from ..data.synthetic import MOTION_CLASSES


def manifest_label_map(urls: Any) -> dict[str, int] | None:
    """``{name: index}`` of the shards folder ``urls`` (its ``manifest.json``), or ``None`` without one."""
    manifest = Path(str(urls)) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        labels = json.loads(manifest.read_text()).get("label_map")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{manifest}: not a JSON object with a label_map ({err})") from err
    return {str(name): int(index) for name, index in labels.items()} if labels else None


def names_from_label_map(label_map: Mapping[str, int], classes: int, where: str) -> list[str]:
    """The label map as a list indexed by class; every index in ``[0, classes)`` named exactly once."""
    names = [f"class_{i}" for i in range(classes)]
    seen: dict[int, str] = {}
    for name, index in label_map.items():
        if not 0 <= index < classes:
            raise ValueError(f"{where}: label {name!r} has index {index}, outside [0, {classes})")
        if index in seen:
            raise ValueError(f"{where}: labels {seen[index]!r} and {name!r} share index {index}")
        seen[index] = names[index] = name
    return names


def class_names(data: DataSection, classes: int) -> list[str]:
    """The names of a run's ``classes`` labels (see the module docstring)."""
    if isinstance(data, SyntheticData):
        return ["-".join(parts) for parts in MOTION_CLASSES][:classes] + [
            f"class_{i}" for i in range(len(MOTION_CLASSES), classes)
        ]
    train = manifest_label_map(data.urls)
    val_urls = data.val_urls
    if val_urls and train is not None:
        val = manifest_label_map(val_urls)
        if val is not None and val != train:
            raise ValueError(
                f"data.val_urls={val_urls}: its label map numbers classes differently from data.urls={data.urls} "
                "(rebuild one with adamae-shards --label-map from the other's manifest.json)"
            )
    if train is None:
        return [f"class_{i}" for i in range(classes)]
    return names_from_label_map(train, classes, f"{data.urls}/manifest.json")


__all__ = ["class_names", "folder_class_names", "manifest_label_map", "names_from_label_map"]
