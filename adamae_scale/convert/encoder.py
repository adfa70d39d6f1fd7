"""``export-encoder``: the encoder alone (no token sampler, no decoder), for fine-tuning.

Key layout ``adamae`` (the default) is the encoder's own ``state_dict`` (``adamae_scale.models.adamae.Encoder``),
which is also the layout of the reference VideoMAE/AdaMAE fine-tuning ViT (``patch_embed``, ``blocks``,
``norm``), D = ``embed_dim``, C·t·p·p = channels × tubelet × patch × patch::

    patch_embed.proj.weight   [D, C, t, p, p]   Conv3d over (t, p, p) tubelets, tokens ordered (time, row, column)
    patch_embed.proj.bias     [D]
    blocks.{i}.norm1.{weight,bias}              LayerNorm, eps 1e-6
    blocks.{i}.attn.qkv.weight      [3D, D]     rows: query, key, value
    blocks.{i}.attn.q_bias, v_bias  [D]         the key bias is fixed at zero
    blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.norm2.{weight,bias}              LayerNorm, eps 1e-6
    blocks.{i}.mlp.fc1.{weight,bias}  [H, D], [H]   H = round(D * mlp_ratio), exact GELU
    blocks.{i}.mlp.fc2.{weight,bias}  [D, H], [D]
    norm.{weight,bias}                          final LayerNorm, eps 1e-6

Position embedding: the fixed 1-D sin-cos table over the N = (T/t)(H/p)(W/p) tokens (``sincos_table_1d``), added
after the patch embedding; it is not a parameter, so it is not in this layout.

Key layout ``timm`` matches timm's ``VisionTransformer``/``Block`` naming: ``attn.q_bias``/``attn.v_bias``
become one ``attn.qkv.bias`` [3D] = (q_bias, 0, v_bias), and ``pos_embed`` [1, N, D] holds the fixed table
(timm keeps position embeddings as a tensor in the state dict; there is no class token). The blocks and
``norm`` load strictly into timm ``Block(D, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm(eps=1e-6))``;
the patch embedding stays a Conv3d (timm's image ViTs have a Conv2d there).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_output_dir
from ..base.weights import LazyTensor, SafetensorsReader, TensorLike
from ..models import AdaMAEConfig
from ..models.layers import sincos_table_1d
from .arch import check_shapes, describe
from .errors import ConvertError
from .folder import (
    FORMAT_ENCODER,
    FORMAT_FULL,
    FORMAT_VERSION,
    MODEL_FILE,
    folder_model_config,
    read_folder_config,
    write_folder,
)

KEY_LAYOUTS = ("adamae", "timm")
_QKV_WEIGHT = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")
_QV_BIAS = re.compile(r"blocks\.\d+\.attn\.[qv]_bias")


def _qkv_bias(q_bias: TensorLike, v_bias: TensorLike) -> LazyTensor:
    def build() -> torch.Tensor:
        q, v = q_bias.contiguous(), v_bias.contiguous()
        return torch.cat([q, torch.zeros_like(q), v])

    return LazyTensor((3 * q_bias.shape[0],), q_bias.dtype, build)


def encoder_tensors(
    full: Mapping[str, TensorLike], cfg: AdaMAEConfig, key_layout: str = "adamae"
) -> dict[str, TensorLike]:
    """The encoder's tensors from a full model's, renamed for ``key_layout`` (see the module docstring)."""
    if key_layout not in KEY_LAYOUTS:
        raise ConvertError(f"--key-layout {key_layout!r}: expected one of {KEY_LAYOUTS}")
    encoder = {name[len("encoder.") :]: value for name, value in full.items() if name.startswith("encoder.")}
    if key_layout == "adamae":
        return encoder
    out: dict[str, TensorLike] = {"pos_embed": sincos_table_1d(cfg.num_tokens, cfg.embed_dim)}
    for name, value in encoder.items():
        if _QV_BIAS.fullmatch(name):
            continue  # folded into attn.qkv.bias below
        out[name] = value
        if match := _QKV_WEIGHT.fullmatch(name):
            prefix = f"blocks.{match.group(1)}.attn"
            out[f"{prefix}.qkv.bias"] = _qkv_bias(encoder[f"{prefix}.q_bias"], encoder[f"{prefix}.v_bias"])
    return out


def encoder_summary(cfg: AdaMAEConfig, key_layout: str) -> dict[str, Any]:
    """What a fine-tuning script needs to rebuild the encoder, in plain values."""
    return {
        "key_layout": key_layout,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_hidden": round(cfg.embed_dim * cfg.mlp_ratio),
        "norm_eps": 1e-6,
        "qkv_bias": "q_bias and v_bias, key bias zero" if key_layout == "adamae" else "attn.qkv.bias = (q, 0, v)",
        "in_chans": cfg.in_chans,
        "num_frames": cfg.num_frames,
        "img_size": list(cfg.img_size),
        "tubelet_size": cfg.tubelet_size,
        "patch_size": cfg.patch_size,
        "token_grid": list(cfg.layout.grid),
        "num_tokens": cfg.num_tokens,
        "pos_embed": cfg.pos_embed + (" (stored as pos_embed)" if key_layout == "timm" else " (fixed, not stored)"),
        "token_order": "time, row, column",
    }


def export_encoder(
    src: str | Path,
    out_dir: str | Path,
    key_layout: str = "adamae",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the encoder of the full-model folder ``src`` into ``out_dir``; returns its ``config.json``."""
    source_config = read_folder_config(src, FORMAT_FULL)
    cfg = folder_model_config(source_config)
    if key_layout == "timm" and cfg.pos_embed != "sincos_1d":
        raise ConvertError(f"--key-layout timm stores the 1-D sin-cos table, but this model uses {cfg.pos_embed}")
    with SafetensorsReader(Path(src) / MODEL_FILE) as reader:
        full = reader.lazy_dict()
        check_shapes({name: t.shape for name, t in full.items()}, cfg, f"SRC {src}")
        out_dtype = dtype or full["encoder.norm.weight"].dtype
        config = {
            "format": FORMAT_ENCODER,
            "format_version": FORMAT_VERSION,
            "key_layout": key_layout,
            "model": cfg.to_dict(),
            "encoder": encoder_summary(cfg, key_layout),
            "source": {"kind": FORMAT_FULL, "folder": str(Path(src).absolute()), "source": source_config.get("source")},
            "description": describe(cfg),
        }
        with atomic_output_dir(out_dir, overwrite, inputs=[src]) as tmp:
            written = write_folder(tmp, encoder_tensors(full, cfg, key_layout), config, out_dtype)
    return written


__all__ = ["KEY_LAYOUTS", "encoder_summary", "encoder_tensors", "export_encoder"]
