"""``to-hf``: encoder + decoder as a Hugging Face ``transformers`` ``VideoMAEForPreTraining`` folder.

HF's VideoMAE is the reference architecture: the same 1-D sin-cos table (for encoder and decoder),
separate query/value biases with no key bias, visible tokens then mask tokens into the decoder, a head
over the masked tokens only. Inputs differ in layout only: ``pixel_values`` is ``[B, T, C, H, W]`` (ours
``[B, C, T, H, W]``) and ``bool_masked_pos`` is our ``mask`` (True = masked). Non-square clips work
(``image_size`` becomes ``[H, W]``).

Config: ``hidden_size`` = embed_dim, ``num_hidden_layers`` = depth, ``num_attention_heads`` = num_heads,
``intermediate_size`` = round(embed_dim·mlp_ratio), ``decoder_hidden_size``/``decoder_num_hidden_layers``/
``decoder_num_attention_heads``/``decoder_intermediate_size`` likewise, ``num_channels``, ``num_frames``,
``tubelet_size``, ``patch_size``, ``image_size``, ``layer_norm_eps`` = 1e-6, ``hidden_act`` = exact ``gelu``,
``qkv_bias`` = True, ``use_mean_pooling`` = False (so the encoder keeps its final LayerNorm, as in
pre-training), ``norm_pix_loss`` as chosen (this project's default target is normalised pixels).

Keys: ``encoder.patch_embed.proj`` → ``videomae.embeddings.patch_embeddings.projection``;
``encoder.blocks.{i}`` → ``videomae.encoder.layer.{i}`` and ``decoder.blocks.{i}`` → ``decoder.decoder_layers.{i}``,
inside which ``norm1``/``norm2`` → ``layernorm_before``/``layernorm_after``, ``attn.qkv.weight`` → the three
``attention.attention.{query,key,value}.weight`` row blocks, ``attn.q_bias``/``v_bias`` →
``attention.attention.q_bias``/``v_bias`` (the names every transformers version loads; 5.x renames them to
``query.bias``/``value.bias`` on load), ``attn.proj`` → ``attention.output.dense``, ``mlp.fc1``/``fc2`` →
``intermediate.dense``/``output.dense``; ``encoder.norm`` → ``videomae.layernorm``; ``encoder_to_decoder``,
``mask_token``, ``decoder.norm``, ``decoder.head`` keep their names. The token sampler is not exported:
HF's VideoMAE takes its mask as input.

One known difference: HF builds the decoder's final LayerNorm with PyTorch's default eps (1e-5) whatever the
config says; the reference and this project use 1e-6. The effect on outputs is far below 1e-4 for trained
or reference-initialised weights (the parity test measures it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_output_dir
from ..base.weights import SafetensorsReader, TensorLike, lazy_map, write_safetensors
from ..models import AdaMAEConfig
from .arch import check_shapes
from .errors import ConvertError
from .folder import (
    FORMAT_CLASSIFIER,
    FORMAT_FULL,
    MODEL_FILE,
    folder_class_names,
    folder_model_config,
    read_folder_config,
)

HF_ARCHITECTURE = "VideoMAEForPreTraining"
HF_CLASSIFIER = "VideoMAEForVideoClassification"
_BLOCK_PARTS = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.q_bias": "attention.attention.q_bias",
    "attn.v_bias": "attention.attention.v_bias",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_LEVEL = {
    "encoder.patch_embed.proj": "videomae.embeddings.patch_embeddings.projection",
    "encoder.norm": "videomae.layernorm",
    "encoder_to_decoder": "encoder_to_decoder",
    "mask_token": "mask_token",
    "patch_embed.proj": "videomae.embeddings.patch_embeddings.projection",  # a fine-tuned classifier's names
    "fc_norm": "fc_norm",
    "head": "classifier",
    "decoder.norm": "decoder.norm",
    "decoder.head": "decoder.head",
}
_BLOCK = re.compile(r"(encoder\.|decoder\.|)blocks\.(\d+)\.(.+)")


def hf_config_kwargs(cfg: AdaMAEConfig, norm_pix_loss: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``transformers.VideoMAEConfig`` describing ``cfg``'s encoder and decoder."""
    if cfg.pos_embed != "sincos_1d":
        raise ConvertError(f"HF VideoMAE uses the 1-D sin-cos position table; this model uses {cfg.pos_embed}")
    height, width = cfg.img_size
    return {
        "image_size": height if height == width else [height, width],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames,
        "tubelet_size": cfg.tubelet_size,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": round(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_mean_pooling": False,
        "decoder_hidden_size": cfg.decoder_embed_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_num_heads,
        "decoder_intermediate_size": round(cfg.decoder_embed_dim * cfg.mlp_ratio),
        "norm_pix_loss": norm_pix_loss,
    }


def _rows(source: TensorLike, start: int, stop: int) -> TensorLike:
    return lazy_map(source, lambda t: t[start:stop].clone(), shape=(stop - start, *source.shape[1:]))


def hf_state(full: Mapping[str, TensorLike]) -> dict[str, TensorLike]:
    """HF ``VideoMAEForPreTraining`` keys for our full-model tensors (the sampler's are left out)."""
    out: dict[str, TensorLike] = {}
    for name, value in full.items():
        if name.startswith("sampler."):
            continue
        if match := _BLOCK.fullmatch(name):
            where, index, part = match.groups()
            prefix = f"videomae.encoder.layer.{index}" if where != "decoder." else f"decoder.decoder_layers.{index}"
            if part == "attn.qkv.weight":
                width = value.shape[1]
                for row, projection in enumerate(("query", "key", "value")):
                    out[f"{prefix}.attention.attention.{projection}.weight"] = _rows(
                        value, row * width, (row + 1) * width
                    )
                continue
            module, _, leaf = part.rpartition(".") if part.endswith((".weight", ".bias")) else (part, "", "")
            target = _BLOCK_PARTS[module] + (f".{leaf}" if leaf else "")
            out[f"{prefix}.{target}"] = value
            continue
        module, _, leaf = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
        out[_TOP_LEVEL[module] + (f".{leaf}" if leaf else "")] = value
    return out


def export_hf(
    src: str | Path,
    out_dir: str | Path,
    norm_pix_loss: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``config.json`` + ``model.safetensors`` for ``VideoMAEForPreTraining.from_pretrained(out_dir)``, or,
    for a fine-tuned classifier folder, ``VideoMAEForVideoClassification`` (``use_mean_pooling``, the folder's
    class names as ``id2label``/``label2id``). An attentive probe is refused: transformers has no such head."""
    source_config = read_folder_config(src)
    classifier = source_config["format"] == FORMAT_CLASSIFIER
    if source_config["format"] not in (FORMAT_FULL, FORMAT_CLASSIFIER):
        raise ConvertError(
            f"SRC {src} holds an encoder-only export, but this command needs a full model (consolidate/import "
            "output) or a fine-tuned classifier (adamae-finetune's RUN_DIR/model)"
        )
    if classifier and source_config.get("attentive") is not None:
        raise ConvertError(
            f"SRC {src} is an attentive probe; transformers' {HF_CLASSIFIER} has mean pooling only, no attentive "
            "pooler to hold it"
        )
    cfg = folder_model_config(source_config)
    kwargs = hf_config_kwargs(cfg, norm_pix_loss)
    if classifier:
        # Mean pooling: no final encoder LayerNorm, the pooled features go through fc_norm into the classifier.
        classes = int(source_config["num_classes"])
        names = folder_class_names(source_config, classes)
        kwargs.update(
            use_mean_pooling=True,
            num_labels=classes,
            id2label=dict(enumerate(names)),
            label2id={name: index for index, name in enumerate(names)},
        )
    try:
        from transformers import VideoMAEConfig
    except ImportError as err:
        raise ConvertError("to-hf needs the transformers package: pip install 'adamae_scale[hf]'") from err
    hf_config = VideoMAEConfig(**kwargs)
    hf_config.architectures = [HF_CLASSIFIER if classifier else HF_ARCHITECTURE]
    with SafetensorsReader(Path(src) / MODEL_FILE) as reader:
        full = reader.lazy_dict()
        if not classifier:
            check_shapes({name: t.shape for name, t in full.items()}, cfg, f"SRC {src}")
        with atomic_output_dir(out_dir, overwrite, inputs=[src]) as tmp:
            write_safetensors(tmp / MODEL_FILE, hf_state(full), metadata={"format": "pt"}, dtype=dtype)
            # transformers 5 names this field ``dtype``, 4.x ``torch_dtype``.
            dtype_field = "dtype" if hasattr(hf_config, "dtype") else "torch_dtype"
            setattr(hf_config, dtype_field, "float32" if dtype == torch.float32 else "bfloat16")
            hf_config.save_pretrained(tmp)
    return hf_config.to_dict()


__all__ = ["HF_ARCHITECTURE", "HF_CLASSIFIER", "export_hf", "hf_config_kwargs", "hf_state"]
