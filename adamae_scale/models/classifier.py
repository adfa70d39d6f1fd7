"""The fine-tuning network: the ViT encoder over all tokens, a pooling, LayerNorm and a linear head.

With mean pooling this is the reference fine-tuning ViT (VideoMAE/AdaMAE ``modeling_finetune`` with
``use_mean_pooling``) and transformers' ``VideoMAEForVideoClassification``: no sampler, no masking, no final
encoder norm (the pooled features get ``fc_norm`` instead). With an ``AttentiveSpec`` the pooling is the attentive
probe's cross-attention pooler (``models/pooler.py``). Parameter names follow the encoder export (``patch_embed``,
``blocks``), so a pre-trained encoder loads by name; ``pooler``, ``fc_norm`` and ``head`` are new.

The part after the encoder is a ``ProbeHead`` of its own: a frozen-encoder probe can train heads on cached
``probe_input`` features (the mean of the tokens, or all tokens for the attentive pooler) and load them back
into the classifier by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adamae import AdaMAEConfig, encoder_blocks, position_table
from .layers import TubeletEmbed
from .pooler import AttentivePooler, AttentiveSpec


class ProbeHead(nn.Module):
    """``probe_input`` features → logits: ``[B, D]`` token means, or ``[B, N, D]`` tokens with a pooler."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        head_init_scale: float = 0.001,
        head_dropout: float = 0.0,
        attentive: AttentiveSpec | None = None,
    ):
        super().__init__()
        self._build_readout(dim, num_classes, head_init_scale, head_dropout, attentive)

    def _build_readout(
        self, dim: int, num_classes: int, head_init_scale: float, head_dropout: float, attentive: AttentiveSpec | None
    ) -> None:
        self.num_classes, self.attentive = num_classes, attentive
        self.pooler = AttentivePooler(dim, attentive) if attentive is not None else None
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        # The reference: truncated-normal head (std 0.02) and zero bias, both scaled by head_init_scale.
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """``probe_input`` features → normalised pooled features ``[B, D]``."""
        return self.fc_norm(self.pooler(features) if self.pooler is not None else features)

    def read_out(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.pooled(features)))  # (B, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.read_out(features)


class VideoClassifier(ProbeHead):
    """``video [B, C, T, H, W]`` → class logits ``[B, num_classes]`` (``features`` gives the pooled ``[B, D]``)."""

    def __init__(
        self,
        cfg: AdaMAEConfig,
        num_classes: int,
        head_init_scale: float = 0.001,
        head_dropout: float = 0.0,
        attentive: AttentiveSpec | None = None,
    ):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.patch_embed = TubeletEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size)
        self.pos_embed: torch.Tensor
        self.register_buffer("pos_embed", position_table(cfg, cfg.embed_dim), persistent=False)
        self.blocks = encoder_blocks(cfg)
        self._build_readout(cfg.embed_dim, num_classes, head_init_scale, head_dropout, attentive)

    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The encoder's output tokens ``[B, N, D]`` (no final norm)."""
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return x

    def probe_input(self, video: torch.Tensor) -> torch.Tensor:
        """What a frozen-encoder probe reads: all tokens ``[B, N, D]`` for the attentive pooler, else their mean
        ``[B, D]`` (what a feature cache stores)."""
        x = self.tokens(video)
        return x if self.pooler is not None else x.mean(dim=1)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.probe_input(video))  # (B, D)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.read_out(self.probe_input(video))  # (B, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for timm's layer-wise lr decay: the patch embedding is layer 0, block i is layer i + 1,
        ``pooler``, ``fc_norm`` and ``head`` come last, a layer of their own (the reference's ``get_layer_id``;
        timm's ordinal 99999 would merge them into the last block's layer)."""
        return {
            "stem": r"^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^pooler|^fc_norm|^head", (1_000_000,))],
        }

    def block_list(self) -> list[nn.Module]:
        """The transformer blocks, for activation checkpointing applied from outside."""
        return list(self.blocks)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


READOUT_PREFIXES = ("pooler.", "fc_norm.", "head.")  # the ProbeHead's parameters inside a VideoClassifier

__all__ = ["READOUT_PREFIXES", "ProbeHead", "VideoClassifier"]
