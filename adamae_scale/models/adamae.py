"""AdaMAE: a video masked autoencoder whose visible tokens are chosen by a learned sampler.

A clip flows: pixels → tubelet tokens → (sampler logits → visible set) → encoder over visible
tokens → decoder over visible + mask tokens → pixels of the masked tokens. The model returns
tensors only; losses live in ``adamae_scale.losses`` and nothing here knows about DeepSpeed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .layers import Block, Linear, TubeletEmbed, sincos_table_1d, sincos_table_3d, trunc_normal
from .masking import (
    STRATEGIES,
    TokenLayout,
    check_decoder_mask,
    decoder_targets,
    keyed_noise,
    num_reconstructed_tokens,
    num_visible_tokens,
    sample_mask,
    split_indices,
)
from .sampler import SAMPLER_PRECISIONS, TokenSampler, token_log_probs


@dataclass
class AdaMAEConfig:
    """Everything needed to rebuild the network (saved next to every checkpoint as ``config.json``)."""

    name: str = "vit_base"
    # Input clip and tokenisation.
    num_frames: int = 16
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    # Encoder.
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    pos_embed: str = "sincos_1d"  # the reference's table; "sincos_3d" factorises it over (t, h, w)
    # Decoder.
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    # Masking.
    masking: str = "adaptive"
    mask_ratio: float = 0.95
    sampler_num_heads: int = 8
    sampler_dropout: float = 0.1
    sampler_precision: str = "fp32"  # fp32 (reference) | tf32 | bf16: the sampler block only (models/sampler.py)
    sampler_width_ratio: float = 1.0  # the sampler block's width as a share of the encoder's (1.0 = reference)
    sampler_pool: int = 1  # the sampler block runs over (pool x pool)-pooled spatial cells; 1 = every token
    sampler_kv_pool: int = 1  # the sampler's attention reads keys/values pooled over (k x k) cells; 1 = every token
    # Decoder masking: the share of the encoder-masked tokens the decoder does not reconstruct (0 = all).
    decoder_ratio: float = 0.0
    decoder_mask: str = "running_cell"  # running_cell (VideoMAE V2, ratio 0.5) | random

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        if self.masking not in STRATEGIES:
            raise ValueError(f"masking.strategy must be one of {STRATEGIES}, got {self.masking!r}")
        if self.sampler_precision not in SAMPLER_PRECISIONS:
            raise ValueError(
                f"model.sampler_precision must be one of {SAMPLER_PRECISIONS}, got {self.sampler_precision!r}"
            )
        width = self.sampler_width
        if not 0.0 < self.sampler_width_ratio <= 1.0 or width < 1 or width % self.sampler_num_heads:
            raise ValueError(
                f"model.sampler_width_ratio={self.sampler_width_ratio}: expected a share in (0, 1] of the encoder's "
                f"width {self.embed_dim} that gives a multiple of model.sampler_num_heads={self.sampler_num_heads} "
                f"(got {width})"
            )
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}")
        for axis, size in zip(("height", "width"), self.img_size, strict=True):
            if size % self.patch_size:
                raise ValueError(f"image {axis} {size} is not a multiple of patch_size={self.patch_size}")
        _, grid_h, grid_w = self.layout.grid
        if self.sampler_pool < 1 or grid_h % self.sampler_pool or grid_w % self.sampler_pool:
            raise ValueError(
                f"model.sampler_pool={self.sampler_pool}: expected a positive integer dividing the {grid_h}x{grid_w} "
                "token grid"
            )
        cells = self.sampler_pool * self.sampler_kv_pool
        if self.sampler_kv_pool < 1 or grid_h % cells or grid_w % cells:
            raise ValueError(
                f"model.sampler_kv_pool={self.sampler_kv_pool}: expected a positive integer such that "
                f"sampler_pool x sampler_kv_pool = {cells} divides the {grid_h}x{grid_w} token grid"
            )
        if not 0.0 <= self.decoder_ratio < 1.0:
            raise ValueError(f"masking.decoder_ratio={self.decoder_ratio}: expected a share in [0, 1) (0 = off)")
        check_decoder_mask(self.decoder_mask, self.decoder_ratio)

    @property
    def layout(self) -> TokenLayout:
        h, w = self.img_size
        return TokenLayout((self.num_frames // self.tubelet_size, h // self.patch_size, w // self.patch_size))

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def num_visible(self) -> int:
        return num_visible_tokens(self.masking, self.layout, self.mask_ratio)

    @property
    def sampler_width(self) -> int:
        return round(self.embed_dim * self.sampler_width_ratio)

    @property
    def num_reconstructed(self) -> int:
        """Tokens the decoder reconstructs per clip: every masked one unless decoder masking is on."""
        return num_reconstructed_tokens(self.num_tokens - self.num_visible, self.decoder_ratio)

    @property
    def pixels_per_token(self) -> int:
        return self.in_chans * self.tubelet_size * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["img_size"] = list(self.img_size)
        return out


class AdaMAEOutput(NamedTuple):
    """A named tuple so that wrappers which walk module outputs (ZeRO-3's hooks) see every tensor."""

    pred: torch.Tensor  # (B, N_rec, pixels_per_token): predictions for the reconstructed tokens, ascending
    mask: torch.Tensor  # (B, N) bool, True = masked for the encoder
    # (B, N_rec) token indices of ``pred``'s rows: the masked tokens the decoder reconstructed (all of them
    # unless masking.decoder_ratio > 0).
    masked_idx: torch.Tensor
    logits: torch.Tensor | None  # (B, N) fp32 sampler logits (adaptive only)
    log_probs: torch.Tensor | None  # (B, N) fp32 log softmax(logits) (adaptive only)


def keyed_mask_noise(cfg: AdaMAEConfig, sample_ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """``AdaMAE.forward``'s noise arguments for clips keyed by their stream positions ``sample_ids [B]``:
    ``noise`` (the encoder's mask) and, with decoder masking, ``decoder_noise`` (the decoder's targets). A clip
    gets the same masks whatever the world size, micro-batch split or rank (``masking.keyed_noise``)."""
    n = cfg.num_tokens
    if cfg.decoder_ratio == 0:
        return {"noise": keyed_noise(sample_ids, (n,), seed)[0]}
    noise, decoder_noise = keyed_noise(sample_ids, (n, n + 1), seed)
    return {"noise": noise, "decoder_noise": decoder_noise}


def position_table(cfg: AdaMAEConfig, dim: int) -> torch.Tensor:
    if cfg.pos_embed == "sincos_1d":
        return sincos_table_1d(cfg.num_tokens, dim)
    if cfg.pos_embed == "sincos_3d":
        return sincos_table_3d(cfg.layout.grid, dim)
    raise ValueError(f"model.pos_embed must be 'sincos_1d' or 'sincos_3d', got {cfg.pos_embed!r}")


def encoder_blocks(cfg: AdaMAEConfig) -> nn.ModuleList:
    """The encoder's ViT blocks, drop path rising linearly from 0 to ``cfg.drop_path`` over the depth."""
    drop_path = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    return nn.ModuleList(
        Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, drop_path=dp) for dp in drop_path
    )


class Encoder(nn.Module):
    """Tubelet embedding + ViT blocks over the visible tokens + final LayerNorm (eps 1e-6)."""

    def __init__(self, cfg: AdaMAEConfig):
        super().__init__()
        self.patch_embed = TubeletEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size)
        self.pos_embed: torch.Tensor
        self.register_buffer("pos_embed", position_table(cfg, cfg.embed_dim), persistent=False)
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        x = tokens + self.pos_embed.to(tokens.dtype)  # (B, N, D)
        x = _gather_tokens(x, visible_idx)  # (B, N_vis, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N_vis, D)


class Decoder(nn.Module):
    """ViT blocks over [visible, mask tokens] and a head that predicts the masked tokens' pixels."""

    def __init__(self, cfg: AdaMAEConfig):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.blocks = nn.ModuleList(
            Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = Linear(dim, cfg.pixels_per_token)

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -num_masked:]))  # (B, N_masked, pixels_per_token)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class AdaMAE(nn.Module):
    """The whole pre-training network. ``forward(video)`` samples a mask with the configured strategy;
    ``forward(video, mask=...)`` uses the given one (evaluation, visualisation, parity tests)."""

    def __init__(self, cfg: AdaMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.sampler = (
            TokenSampler(
                cfg.embed_dim,
                cfg.num_tokens,
                cfg.sampler_num_heads,
                cfg.sampler_dropout,
                cfg.sampler_precision,
                width=cfg.sampler_width,
                pool=cfg.sampler_pool,
                grid=cfg.layout.grid,
                kv_pool=cfg.sampler_kv_pool,
            )
            if cfg.masking == "adaptive"
            else None
        )
        self.encoder_to_decoder = Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(trunc_normal((1, 1, cfg.decoder_embed_dim), std=0.02))
        self.decoder_pos_embed: torch.Tensor
        self.register_buffer("decoder_pos_embed", position_table(cfg, cfg.decoder_embed_dim), persistent=False)
        self.decoder = Decoder(cfg)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order, for activation checkpointing applied from outside."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    def sample_logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return None if self.sampler is None else self.sampler(tokens)

    def forward(
        self,
        video: torch.Tensor,
        mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        decoder_noise: torch.Tensor | None = None,
    ) -> AdaMAEOutput:
        """``video``: ``[B, C, T, H, W]`` normalised pixels. ``mask``: optional ``[B, N]`` bool to use
        as is. ``noise``: optional uniform noise ``[B, N]`` driving the mask sampling; ``decoder_noise``:
        optional uniform noise ``[B, N + 1]`` driving the decoder's targets (``masking.decoder_ratio > 0``)."""
        batch = video.shape[0]
        tokens = self.encoder.patch_embed(video)  # (B, N, D)
        logits = self.sample_logits(tokens)  # (B, N) fp32 or None
        if mask is None:
            mask = sample_mask(
                self.cfg.masking, self.cfg.layout, self.cfg.num_visible, batch, video.device, logits, noise
            )
        visible_idx, masked_idx = split_indices(mask)  # (B, N_vis), (B, N_masked)
        if self.cfg.decoder_ratio > 0:  # the masked tokens the decoder reconstructs: (B, N_rec)
            masked_idx = decoder_targets(
                mask, self.cfg.layout.grid, self.cfg.num_reconstructed, self.cfg.decoder_mask, decoder_noise
            )

        latent = self.encoder(tokens, visible_idx)  # (B, N_vis, D)
        x_vis = self.encoder_to_decoder(latent)  # (B, N_vis, D_dec)
        pos = self.decoder_pos_embed.to(x_vis.dtype).expand(batch, -1, -1)  # (B, N, D_dec)
        x_masked = self.mask_token.to(x_vis.dtype) + _gather_tokens(pos, masked_idx)  # (B, N_rec, D_dec)
        x = torch.cat([x_vis + _gather_tokens(pos, visible_idx), x_masked], dim=1)  # (B, N_vis + N_rec, D_dec)
        pred = self.decoder(x, masked_idx.shape[1])  # (B, N_rec, pixels_per_token)

        log_probs = None if logits is None else token_log_probs(logits)
        return AdaMAEOutput(pred=pred, mask=mask, masked_idx=masked_idx, logits=logits, log_probs=log_probs)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


__all__ = ["AdaMAE", "AdaMAEConfig", "AdaMAEOutput", "Decoder", "Encoder", "keyed_mask_noise"]
