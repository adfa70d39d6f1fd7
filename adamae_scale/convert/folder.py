"""This project's weight folders: ``model.safetensors`` + ``config.json``.

``config.json`` is ``{"format": ..., "format_version": 1, "dtype": ..., "model": AdaMAEConfig.to_dict(), ...}``:

- ``format: "adamae-full"``: the whole pre-training network (encoder, sampler if adaptive, decoder),
  under the parameter names of ``AdaMAE.state_dict()``. Written by ``consolidate`` and ``import``.
- ``format: "adamae-encoder"``: the encoder only, for fine-tuning (``export-encoder``); its
  ``key_layout`` field says which naming it uses.
- ``format: "adamae-classifier"``: a fine-tuned ``VideoClassifier`` (``adamae-finetune`` writes it as
  ``RUN_DIR/model``), with ``num_classes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import write_json
from ..base.weights import SafetensorsReader, TensorLike, write_safetensors
from ..models import AdaMAE, AdaMAEConfig, make_config
from .errors import ConvertError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_FULL = "adamae-full"
FORMAT_ENCODER = "adamae-encoder"
FORMAT_CLASSIFIER = "adamae-classifier"
FORMAT_VERSION = 1

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def write_folder(
    out_dir: Path, tensors: Mapping[str, TensorLike], config: Mapping[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """Write ``model.safetensors`` (floating tensors cast to ``dtype``) and ``config.json`` (``config`` plus
    its ``dtype`` field) into ``out_dir``; returns the written config."""
    written = {**config, "dtype": DTYPE_NAMES[dtype]}
    write_safetensors(out_dir / MODEL_FILE, tensors, metadata={"format": "pt"}, dtype=dtype)
    write_json(out_dir / CONFIG_FILE, written)
    return written


def _looks_like_deepspeed(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(folder.glob("*_model_states.pt")) or (folder / "checkpoints").is_dir()


def read_folder_config(src: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """``config.json`` of a folder written by this tool, checked; ``expected_format`` restricts the kind."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"SRC {src}: no such folder")
    if not src.is_dir():
        raise ConvertError(
            f"SRC {src} is a file; expected a folder written by 'adamae-convert consolidate' or 'import'"
        )
    config_path = src / CONFIG_FILE
    if not (src / MODEL_FILE).is_file() or not config_path.is_file():
        if _looks_like_deepspeed(src):
            raise ConvertError(
                f"SRC {src} is a DeepSpeed checkpoint; run 'adamae-convert consolidate {src} OUT_DIR' first "
                "and pass OUT_DIR"
            )
        raise ConvertError(
            f"SRC {src} has no {MODEL_FILE} + {CONFIG_FILE}; expected a folder written by "
            "'adamae-convert consolidate' or 'import'"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{config_path}: not valid JSON ({err})") from err
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt not in (FORMAT_FULL, FORMAT_ENCODER, FORMAT_CLASSIFIER) or "model" not in config:
        raise ConvertError(
            f"{config_path} is not an adamae-convert config (format {fmt!r}); it may be a Hugging Face or other folder"
        )
    if expected_format is not None and fmt != expected_format:
        what = {
            FORMAT_FULL: "a full model (consolidate/import output)",
            FORMAT_ENCODER: "an encoder-only export",
            FORMAT_CLASSIFIER: "a fine-tuned classifier (adamae-finetune's RUN_DIR/model)",
        }
        raise ConvertError(f"SRC {src} holds {what[fmt]}, but this command needs {what[expected_format]}")
    return config


def folder_model_config(config: Mapping[str, Any]) -> AdaMAEConfig:
    try:
        return make_config(config["model"])
    except (TypeError, ValueError) as err:
        raise ConvertError(f"config.json 'model' section is not a valid AdaMAE config ({err})") from err


def load_model(src: str | Path) -> AdaMAE:
    """An ``AdaMAE`` (fp32, eval mode) with the weights of a full-model folder, loaded strictly."""
    config = read_folder_config(src, FORMAT_FULL)
    model = AdaMAE(folder_model_config(config))
    with SafetensorsReader(Path(src) / MODEL_FILE) as reader:
        state = {name: reader.lazy(name).contiguous().float() for name in reader.keys()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def folder_class_names(config: Mapping[str, Any], classes: int) -> list[str]:
    """``class_names`` of a classifier folder's ``config.json`` (older folders have none: ``class_i``)."""
    names = config.get("class_names")
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) == classes:
        return [str(name) for name in names]
    return [f"class_{i}" for i in range(classes)]


__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "FORMAT_CLASSIFIER",
    "FORMAT_ENCODER",
    "FORMAT_FULL",
    "MODEL_FILE",
    "folder_class_names",
    "folder_model_config",
    "load_model",
    "read_folder_config",
    "write_folder",
]
