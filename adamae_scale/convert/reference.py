"""``import``: checkpoints of the reference AdaMAE release and of VideoMAE → this project's weights.

Both releases save ``checkpoint-{epoch}.pth`` = ``{'model' (or 'module'): state_dict, 'optimizer',
'epoch', 'scaler', 'args'}``. Their key names differ from ours only around the token sampler:

=====================================================  ==============================================
reference key                                          this project
=====================================================  ==============================================
``encoder.pos_embed_probs``                            ``sampler.pos_embed_probs``
``encoder.get_token_probs.0.*`` (the sampler block)    ``sampler.block.*``
``encoder.get_token_probs.1.{weight,bias}`` (Linear)   ``sampler.head.{weight,bias}``
``encoder.patch_embed.proj.*``, ``encoder.blocks.{i}.*``, ``encoder.norm.*``, ``encoder_to_decoder.weight``,
``mask_token``, ``decoder.blocks.{i}.*``, ``decoder.norm.*``, ``decoder.head.*``: the same names
=====================================================  ==============================================

VideoMAE checkpoints have no sampler keys: they import as a ``tube``-masking model (VideoMAE's own
default; ``--masking random`` also fits), or, with ``--masking adaptive``, with a freshly initialised
sampler (the reference initialisation, seeded by ``--seed``) that the report lists. Every key is either
used or explained; anything else is refused:

- ``encoder.pos_embed`` / ``pos_embed`` / ``decoder.pos_embed``: accepted only if it is the fixed 1-D
  sin-cos table this model computes (then dropped, as it is not a parameter here); a learned table is refused.
- ``encoder.head.*`` (a classifier: a fine-tuned checkpoint), ``*.gamma_1/2`` (layer scale), a ``cls_token``,
  a full ``qkv.bias``, and unprefixed ``blocks.*`` keys (an encoder-only/fine-tuned layout) are refused.

The pickle is read with ``weights_only=True``; the one class allowed beyond tensors and containers is
``argparse.Namespace``, the type of ``args`` in both releases (its fields are plain values). ``args`` is
read for the clip geometry (``num_frames``, ``input_size``), ``mask_type``/``mask_ratio`` and the model
size name. Shapes give everything else; the number of attention heads cannot be seen in shapes, so it
comes from ``--model``/``--num-heads``, the size in ``args.model``, or the size of matching width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_output_dir
from ..base.weights import safe_torch_load
from ..models import AdaMAEConfig
from ..models.layers import sincos_table_1d
from ..models.sampler import TokenSampler
from .arch import check_shapes, describe, expected_shapes, infer_config
from .errors import ArchitectureMismatchError, ConvertError
from .folder import FORMAT_FULL, FORMAT_VERSION, write_folder

REFERENCE_ALLOWED_GLOBALS = ("argparse.Namespace",)
WEIGHT_ENTRIES = ("model", "module", "state_dict")
OTHER_ENTRIES = {
    "optimizer": "optimizer state: not weights",
    "epoch": "training progress: recorded in config.json source",
    "scaler": "AMP loss-scaler state: not weights",
    "args": "training arguments: read for clip geometry, masking and model size only",
    "lr_scheduler": "scheduler state: not weights",
    "model_ema": "an EMA copy: only the main weights are imported",
}

_BLOCK = (
    r"(?:norm1|norm2)\.(?:weight|bias)|attn\.(?:qkv\.weight|q_bias|v_bias|proj\.weight|proj\.bias)"
    r"|mlp\.fc[12]\.(?:weight|bias)"
)
_SAMPLER_BLOCK = (
    r"(?:norm1|norm2)\.(?:weight|bias)|attn\.(?:qkv\.weight|proj\.weight|proj\.bias)|mlp\.fc[12]\.(?:weight|bias)"
)
# (reference pattern, our name as a re.sub template); the same name where the template is None.
_RENAMES: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"encoder\.pos_embed_probs"), "sampler.pos_embed_probs"),
    (re.compile(rf"encoder\.get_token_probs\.0\.({_SAMPLER_BLOCK})"), r"sampler.block.\1"),
    (re.compile(r"encoder\.get_token_probs\.1\.(weight|bias)"), r"sampler.head.\1"),
    (re.compile(r"encoder\.patch_embed\.proj\.(?:weight|bias)"), None),
    (re.compile(rf"(?:encoder|decoder)\.blocks\.\d+\.(?:{_BLOCK})"), None),
    (re.compile(r"(?:encoder|decoder)\.norm\.(?:weight|bias)"), None),
    (re.compile(r"encoder_to_decoder\.weight|mask_token|decoder\.head\.(?:weight|bias)"), None),
]
# Fixed sin-cos tables some releases keep as tensors: (key, which width they are built for).
_FIXED_TABLES = {"encoder.pos_embed": "encoder", "pos_embed": "decoder", "decoder.pos_embed": "decoder"}
_REFUSED: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"encoder\.head\.(?:weight|bias)"),
        "is a classifier on the encoder: this looks like a fine-tuned checkpoint, and import takes pre-training ones",
    ),
    (re.compile(r".*\.gamma_[12]"), "is a layer-scale weight (init_values > 0), which this model does not have"),
    (re.compile(r".*cls_token"), "is a class token, which this model does not have"),
    (re.compile(r".*attn\.qkv\.bias"), "is a full qkv bias (with a key bias); this model has q_bias/v_bias only"),
]


@dataclass
class ImportReport:
    """Where every entry and key of the checkpoint went."""

    source_kind: str = ""
    weights_entry: str = ""
    kept: list[str] = field(default_factory=list)  # imported under the same name
    renamed: dict[str, str] = field(default_factory=dict)  # reference name → our name
    dropped: dict[str, str] = field(default_factory=dict)  # reference name → why it is not imported
    initialised: dict[str, str] = field(default_factory=dict)  # our name → why it is new
    other_entries: dict[str, str] = field(default_factory=dict)  # top-level entry → why it is not weights
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_kind": self.source_kind,
            "weights_entry": self.weights_entry,
            "kept": len(self.kept),
            "renamed": self.renamed,
            "dropped": self.dropped,
            "initialised": self.initialised,
            "other_entries": self.other_entries,
            "notes": self.notes,
        }

    def summary(self) -> str:
        parts = [
            f"{len(self.kept) + len(self.renamed)} tensors imported from '{self.weights_entry}' "
            f"({len(self.kept)} same name, {len(self.renamed)} renamed)"
        ]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)}: " + "; ".join(f"{k} ({v})" for k, v in self.dropped.items()))
        if self.initialised:
            parts.append(
                f"initialised {len(self.initialised)} sampler tensors ({next(iter(self.initialised.values()))})"
            )
        parts.extend(self.notes)
        return "; ".join(parts)


def extract_weights(checkpoint: Any, source: str) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(state_dict, entry name, the other top-level entries)`` of a loaded ``.pth``."""
    if isinstance(checkpoint, Mapping):
        for entry in WEIGHT_ENTRIES:
            if isinstance(checkpoint.get(entry), Mapping):
                others = {k: v for k, v in checkpoint.items() if k != entry}
                return dict(checkpoint[entry]), entry, others
        if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            return dict(checkpoint), "(top level)", {}
        keys = sorted(map(str, checkpoint))[:8]
        raise ConvertError(
            f"{source} has no weights under {', '.join(map(repr, WEIGHT_ENTRIES))} (its entries: {keys})"
        )
    raise ConvertError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")


def rename_reference_keys(
    state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ImportReport]:
    """Pure key map: ``(tensors under our names, fixed tables set aside, report)``; refuses what it cannot place."""
    names = list(state)
    if names and all(n.startswith("module.") for n in names):  # saved from a DistributedDataParallel wrapper
        state = {n[len("module.") :]: t for n, t in state.items()}
    report = ImportReport()
    if not any(n.startswith("encoder.") for n in state):
        example = next(iter(state), "nothing")
        raise ConvertError(
            f"{source} has no 'encoder.*' keys (first key: {example}); import takes AdaMAE/VideoMAE "
            "pre-training checkpoints, not fine-tuned or encoder-only ones"
        )
    renamed: dict[str, torch.Tensor] = {}
    tables: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise ConvertError(f"{source}: {name} is a {type(tensor).__name__}, not a tensor")
        for pattern, why in _REFUSED:
            if pattern.fullmatch(name):
                raise ConvertError(f"{source}: {name} {why}")
        if name in _FIXED_TABLES:
            tables[name] = tensor
            continue
        for pattern, template in _RENAMES:
            if pattern.fullmatch(name):
                target = name if template is None else pattern.sub(template, name)
                renamed[target] = tensor
                if target == name:
                    report.kept.append(name)
                else:
                    report.renamed[name] = target
                break
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:4]) + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else "")
        raise ConvertError(f"{source} has keys this importer does not know: {shown}")
    report.source_kind = "adamae-reference" if "sampler.pos_embed_probs" in renamed else "videomae"
    return renamed, tables, report


# -- from renamed weights to this model's state dict ---------------------------------------------------
def _check_fixed_table(name: str, table: torch.Tensor, cfg: AdaMAEConfig) -> None:
    dim = cfg.embed_dim if _FIXED_TABLES[name] == "encoder" else cfg.decoder_embed_dim
    expected = sincos_table_1d(cfg.num_tokens, dim)
    if tuple(table.shape) != tuple(expected.shape):
        raise ArchitectureMismatchError(
            f"{name} is {list(table.shape)}, but the position table of {describe(cfg)} is "
            f"{list(expected.shape)} (a class token, or another clip geometry?)"
        )
    gap = float((table.float() - expected).abs().max())
    if gap > 1e-4:
        raise ConvertError(
            f"{name} differs from the fixed 1-D sin-cos table by up to {gap:.3g}: a learned position "
            "embedding, which this model does not support"
        )


def fresh_sampler_state(cfg: AdaMAEConfig, seed: int) -> dict[str, torch.Tensor]:
    """A token sampler initialised as ``AdaMAE`` initialises its own (xavier linears, unit norms, zero
    ``pos_embed_probs``), under ``sampler.*`` names."""
    torch.manual_seed(seed)
    sampler = TokenSampler(cfg.embed_dim, cfg.num_tokens, cfg.sampler_num_heads, cfg.sampler_dropout)
    return {f"sampler.{name}": t.detach() for name, t in sampler.state_dict().items()}


def fit_to_config(
    renamed: Mapping[str, torch.Tensor],
    tables: Mapping[str, torch.Tensor],
    cfg: AdaMAEConfig,
    report: ImportReport,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Check the fixed tables, drop or initialise the sampler for ``cfg.masking``, cast to fp32, check shapes."""
    for name, table in tables.items():
        _check_fixed_table(name, table, cfg)
        report.dropped[name] = "the fixed 1-D sin-cos position table (equal to the one this model computes)"
    state = dict(renamed)
    sampler_keys = [name for name in state if name.startswith("sampler.")]
    if cfg.masking != "adaptive" and sampler_keys:
        for name in sampler_keys:
            original = next((k for k, v in report.renamed.items() if v == name), name)
            report.dropped[original] = f"token sampler weights: --masking {cfg.masking} has no sampler"
            report.renamed.pop(original, None)
            del state[name]
    if cfg.masking == "adaptive" and not sampler_keys:
        for name, tensor in fresh_sampler_state(cfg, seed).items():
            state[name] = tensor
            report.initialised[name] = f"not in a VideoMAE checkpoint: fresh sampler, reference init, seed {seed}"
    half = sorted({str(t.dtype) for t in state.values() if t.is_floating_point() and t.dtype != torch.float32})
    if half:
        report.notes.append(f"weights stored as {', '.join(half)} were converted to float32")
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    check_shapes({name: t.shape for name, t in state.items()}, cfg, "the imported checkpoint")
    return {name: state[name] for name in expected_shapes(cfg)}


def import_reference(
    src: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    seed: int = 0,
    **arch: Any,
) -> tuple[dict[str, Any], ImportReport]:
    """Import ``src`` (``checkpoint-*.pth``) into ``out_dir``; ``arch`` are ``infer_config``'s options."""
    src = Path(src)
    if src.is_dir():
        raise ConvertError(f"SRC {src} is a folder; import takes a .pth file (for DeepSpeed folders use consolidate)")
    checkpoint = safe_torch_load(src, REFERENCE_ALLOWED_GLOBALS, mmap=True)
    state, entry, others = extract_weights(checkpoint, str(src))
    renamed, tables, report = rename_reference_keys(state, str(src))
    report.weights_entry = entry
    report.other_entries = {k: OTHER_ENTRIES.get(k, "not weights: ignored") for k in others}
    cfg = infer_config({name: t.shape for name, t in renamed.items()}, args=others.get("args"), **arch)
    weights = fit_to_config(renamed, tables, cfg, report, seed)
    epoch = others.get("epoch")
    config = {
        "format": FORMAT_FULL,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "source": {
            "kind": report.source_kind,
            "file": str(src.absolute()),
            "weights_entry": entry,
            "epoch": epoch if isinstance(epoch, (int, float, str)) else None,
        },
        "import_report": report.to_dict(),
        "description": describe(cfg),
    }
    with atomic_output_dir(out_dir, overwrite, inputs=[src]) as tmp:
        written = write_folder(tmp, weights, config, dtype)
    return written, report


__all__ = [
    "REFERENCE_ALLOWED_GLOBALS",
    "ImportReport",
    "extract_weights",
    "fit_to_config",
    "fresh_sampler_state",
    "import_reference",
    "infer_config",
    "rename_reference_keys",
]
