"""Where a fine-tuning run's encoder weights come from (``init=``), and the key report.

- a ``consolidate``/``import`` folder (``format: adamae-full``): its ``encoder.*`` tensors;
- an ``export-encoder`` folder (``format: adamae-encoder``), either key layout (``timm``'s ``attn.qkv.bias`` is
  split back into ``q_bias``/``v_bias``; its ``pos_embed`` is the fixed table and is dropped);
- a fine-tuned classifier folder (``format: adamae-classifier``: ``adamae-finetune``'s ``RUN_DIR/model`` or a
  consolidated fine-tuning checkpoint): its encoder and ``fc_norm``; its head (and attentive pooler) is dropped
  (new ones are trained);
- a reference AdaMAE / VideoMAE pre-training checkpoint (``checkpoint-*.pth``), read by the importer's safe
  loader (``weights_only`` plus an explicit allowlist);
- ``none``: from scratch (the model comes from ``model=``).

The source's ``config.json`` (or the checkpoint's shapes and ``args``) gives the encoder's architecture and
clip geometry. A different clip (frames, size) keeps every weight: the position table is the fixed sin-cos one
and is recomputed for the new token grid; patch and tubelet sizes cannot change (the patch embedding's kernel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.weights import SafetensorsReader, safe_torch_load
from ..convert.errors import ConvertError
from ..convert.folder import (
    FORMAT_CLASSIFIER,
    FORMAT_ENCODER,
    FORMAT_FULL,
    MODEL_FILE,
    folder_model_config,
    read_folder_config,
)
from ..convert.reference import (
    REFERENCE_ALLOWED_GLOBALS,
    ImportReport,
    extract_weights,
    fit_to_config,
    infer_config,
    rename_reference_keys,
)
from ..models import AdaMAEConfig
from ..models.classifier import READOUT_PREFIXES

SCRATCH = ("none", "", None)
FINAL_NORM = ("norm.weight", "norm.bias")


@dataclass
class KeyReport:
    """What the classifier got from the source: loaded, new (initialised here) and dropped tensors."""

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for why in self.dropped.values():
            groups[why] = groups.get(why, 0) + 1
        dropped = "; ".join(f"{count} {why}" for why, count in groups.items()) or "nothing"
        lines = [
            f"init={self.source} ({self.kind}): loaded {len(self.loaded)} tensors, new {len(self.new)} "
            f"({', '.join(self.new) or 'none'}), dropped {len(self.dropped)} ({dropped})",
            *self.notes,
        ]
        return "\n".join(lines)


@dataclass
class EncoderSource:
    """The encoder's architecture and tensors (names of ``adamae_scale.models.adamae.Encoder``)."""

    cfg: AdaMAEConfig | None  # None: from scratch
    tensors: dict[str, torch.Tensor]
    report: KeyReport


def load_source(init: str | None, weights: bool = True) -> EncoderSource:
    """Read ``init`` (see the module docstring); errors are one-line ``ConvertError``s naming the file.
    ``weights=False`` reads a folder's ``config.json`` only (a check before the run; a ``.pth`` is read whole,
    since its shapes give the architecture)."""
    if init in SCRATCH or str(init).lower() == "none":
        return EncoderSource(None, {}, KeyReport("none", "scratch"))
    path = Path(str(init))
    if path.is_dir():
        return _from_folder(path, weights)
    if path.is_file():
        return _from_reference(path)
    raise ConvertError(f"init={init}: no such file or folder (expected a folder, a .pth checkpoint or none)")


def _from_folder(path: Path, weights: bool) -> EncoderSource:
    config = read_folder_config(path)
    cfg = folder_model_config(config)
    if not weights:
        return EncoderSource(cfg, {}, KeyReport(str(path), "folder (config.json only)"))
    with SafetensorsReader(path / MODEL_FILE) as reader:
        state = {name: reader.lazy(name).contiguous().float() for name in reader.keys()}
    if config["format"] == FORMAT_FULL:
        report = KeyReport(str(path), "pre-training folder (consolidate/import)")
        tensors = {}
        for name, tensor in state.items():
            if name.startswith("encoder."):
                tensors[name[len("encoder.") :]] = tensor
            else:
                report.dropped[name] = _why_dropped(name)
        return EncoderSource(cfg, tensors, report)
    if config["format"] == FORMAT_CLASSIFIER:
        report = KeyReport(str(path), f"fine-tuned classifier ({config.get('num_classes')} classes)")
        tensors = {}
        for name, tensor in state.items():
            if name.startswith("head."):
                report.dropped[name] = "the source's classification head (a new one is trained)"
            elif name.startswith("pooler."):
                report.dropped[name] = "the source's attentive pooler (a new one is trained)"
            else:
                tensors[name] = tensor
        return EncoderSource(cfg, tensors, report)
    assert config["format"] == FORMAT_ENCODER
    layout = config.get("key_layout", "adamae")
    report = KeyReport(str(path), f"encoder export ({layout} key layout)")
    return EncoderSource(cfg, _from_timm_layout(state, report) if layout == "timm" else state, report)


def _from_timm_layout(state: dict[str, torch.Tensor], report: KeyReport) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, tensor in state.items():
        if name == "pos_embed":
            report.dropped[name] = "the fixed sin-cos position table (recomputed)"
        elif name.endswith(".attn.qkv.bias"):
            q, k, v = tensor.chunk(3)
            if bool(k.abs().max() > 0):
                raise ConvertError(f"{name}: the key bias is not zero; this encoder has no place for it")
            prefix = name[: -len("qkv.bias")]
            tensors[f"{prefix}q_bias"], tensors[f"{prefix}v_bias"] = q.clone(), v.clone()
        else:
            tensors[name] = tensor
    return tensors


def _from_reference(path: Path) -> EncoderSource:
    checkpoint = safe_torch_load(path, REFERENCE_ALLOWED_GLOBALS, mmap=True)
    state, entry, others = extract_weights(checkpoint, str(path))
    renamed, tables, import_report = rename_reference_keys(state, str(path))
    cfg = infer_config({name: t.shape for name, t in renamed.items()}, args=others.get("args"))
    weights = fit_to_config(renamed, tables, cfg, ImportReport())
    report = KeyReport(str(path), f"reference checkpoint ({import_report.source_kind}, '{entry}')")
    tensors = {}
    for name, tensor in weights.items():
        if name.startswith("encoder."):
            tensors[name[len("encoder.") :]] = tensor
        else:
            report.dropped[name] = _why_dropped(name)
    for name in tables:
        report.dropped[name] = "the fixed sin-cos position table (recomputed)"
    return EncoderSource(cfg, tensors, report)


def _why_dropped(name: str) -> str:
    if name.startswith("sampler."):
        return "token sampler (no masking when fine-tuning)"
    return "decoder / pre-training head"


def classifier_config(
    source: EncoderSource, scratch: AdaMAEConfig | None, clip: dict[str, Any], drop_path: float
) -> AdaMAEConfig:
    """The classifier's architecture: the source's (or ``scratch``'s), with the clip geometry of ``clip``
    (``num_frames``, ``img_size``; ``None`` keeps the source's) and ``drop_path``."""
    base = source.cfg if source.cfg is not None else scratch
    if base is None:
        raise ValueError("init=none needs a model: pass model=vit_tiny|vit_small|vit_base|... ")
    changes: dict[str, Any] = {"drop_path": drop_path, "masking": "random"}
    if clip.get("num_frames") is not None:
        changes["num_frames"] = int(clip["num_frames"])
    if clip.get("img_size") is not None:
        size = clip["img_size"]
        changes["img_size"] = (size, size) if isinstance(size, int) else tuple(size)
    cfg = dataclasses.replace(base, **changes)
    cfg.__post_init__()
    if source.cfg is not None and cfg.layout.grid != source.cfg.layout.grid:
        source.report.notes.append(
            f"clip {source.cfg.num_frames}x{source.cfg.img_size[0]}x{source.cfg.img_size[1]} -> "
            f"{cfg.num_frames}x{cfg.img_size[0]}x{cfg.img_size[1]}: the fixed {cfg.pos_embed} position table is "
            f"recomputed for the {'x'.join(map(str, cfg.layout.grid))} token grid"
        )
    return cfg


def classifier_state(
    source: EncoderSource, expected: dict[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """The source's tensors under the classifier's names, checked against ``expected`` shapes."""
    report = source.report
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.tensors.items():
        if name in FINAL_NORM:
            report.dropped[name] = "the encoder's final LayerNorm (mean pooling uses the new fc_norm)"
        elif name not in expected:
            raise ConvertError(f"init={report.source}: {name} has no place in the classifier")
        elif tensor.shape != expected[name]:
            raise ConvertError(
                f"init={report.source}: {name} has shape {list(tensor.shape)}, the classifier expects "
                f"{list(expected[name])}"
            )
        else:
            state[name] = tensor
    report.loaded = sorted(state)
    report.new = sorted({name.rsplit(".", 1)[0] for name in expected if name not in state})
    if source.cfg is not None:
        missing = [n for n in expected if n not in state and not n.startswith(READOUT_PREFIXES)]
        if missing:
            raise ConvertError(f"init={report.source}: lacks {len(missing)} encoder tensors, e.g. {missing[0]}")
    return state, report


__all__ = ["EncoderSource", "KeyReport", "classifier_config", "classifier_state", "load_source"]
