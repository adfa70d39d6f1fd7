"""The fine-tuning network: the ViT encoder over all tokens, mean pooling, LayerNorm and a linear head.

This is the reference fine-tuning ViT (VideoMAE/AdaMAE ``modeling_finetune`` with ``use_mean_pooling``) and
transformers' ``VideoMAEForVideoClassification``: no sampler, no masking, no final encoder norm (the pooled
features get ``fc_norm`` instead). Parameter names follow the encoder export (``patch_embed``, ``blocks``), so
a pre-trained encoder loads by name; ``fc_norm`` and ``head`` are new.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adamae import AdaMAEConfig, encoder_blocks, position_table
from .layers import TubeletEmbed


class VideoClassifier(nn.Module):
    """``video [B, C, T, H, W]`` → class logits ``[B, num_classes]`` (``features`` gives the pooled ``[B, D]``)."""

    def __init__(self, cfg: AdaMAEConfig, num_classes: int, head_init_scale: float = 0.001, head_dropout: float = 0.0):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.patch_embed = TubeletEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size)
        self.pos_embed: torch.Tensor
        self.register_buffer("pos_embed", position_table(cfg, cfg.embed_dim), persistent=False)
        self.blocks = encoder_blocks(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        # The reference: truncated-normal head (std 0.02) and zero bias, both scaled by head_init_scale.
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(dim=1))  # (B, D)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.features(video)))  # (B, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for timm's layer-wise lr decay: the patch embedding is layer 0, block i is layer i + 1,
        ``fc_norm`` and ``head`` come last, a layer of their own (the reference's ``get_layer_id``; timm's
        ordinal 99999 would merge them into the last block's layer)."""
        return {"stem": r"^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^fc_norm|^head", (1_000_000,))]}

    def block_list(self) -> list[nn.Module]:
        """The transformer blocks, for activation checkpointing applied from outside."""
        return list(self.blocks)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


__all__ = ["VideoClassifier"]
