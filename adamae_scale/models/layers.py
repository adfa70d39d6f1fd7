"""Building blocks shared by the encoder, decoder and token sampler.

Parameter names follow the reference VideoMAE/AdaMAE release (``attn.qkv``, ``attn.q_bias``,
``attn.v_bias``, ``mlp.fc1`` ...) so that its checkpoints load without renaming inside a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_table_1d(num_positions: int, dim: int) -> torch.Tensor:
    """The reference's fixed 1-D sin-cos table over the flattened token index: ``[1, N, dim]``.

    Even channels hold ``sin(pos / 10000^(2i/dim))``, odd channels the matching ``cos`` (interleaved).
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (N, 1)
    channel = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, dim)
    angle = position / torch.pow(10000.0, 2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float().unsqueeze(0)  # (1, N, dim)


def sincos_table_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """A factorised (t, h, w) sin-cos table ``[1, t*h*w, dim]``: a third of the channels per axis."""
    if dim % 6:
        raise ValueError(f"pos_embed=sincos_3d needs an embedding width divisible by 6, got {dim}")
    per_axis = dim // 3
    axes = []
    for size in grid:
        omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2))
        angle = torch.arange(size, dtype=torch.float64)[:, None] * omega[None, :]
        axes.append(torch.cat([torch.sin(angle), torch.cos(angle)], dim=1))  # (size, per_axis)
    t, h, w = grid
    table = torch.cat(
        [
            axes[0][:, None, None, :].expand(t, h, w, per_axis),
            axes[1][None, :, None, :].expand(t, h, w, per_axis),
            axes[2][None, None, :, :].expand(t, h, w, per_axis),
        ],
        dim=-1,
    )
    return table.reshape(1, t * h * w, dim).float()


class Linear(nn.Linear):
    """``nn.Linear`` initialised as the reference initialises every linear layer (Xavier-uniform
    weight, zero bias), at construction: a model built with ZeRO-3's partitioned construction
    (each module's parameters are sharded as soon as its ``__init__`` returns) is then initialised
    correctly, with no pass over the finished model."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Mlp(nn.Module):
    """``drop(fc2(gelu(fc1(x))))``, with timm's parameter names.

    One dropout, after ``fc2``: the reference (VideoMAE's block, which AdaMAE's sampler uses) has the one
    after the activation commented out, unlike timm's ``Mlp``.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class TubeletEmbed(nn.Module):
    """Non-overlapping (tubelet, patch, patch) cubes → tokens, ordered (t, h, w)."""

    def __init__(self, in_chans: int, dim: int, tubelet_size: int, patch_size: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.proj(video)  # (B, D, T/tubelet, H/patch, W/patch)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    With ``qkv_bias`` the query and value biases are separate parameters and the key bias is fixed at
    zero, as in the reference (a key bias shifts every logit of a query equally, so it is redundant).
    ``kv_reduce`` (a module mapping ``(B, heads, N, head_dim)`` to ``(B, heads, M, head_dim)``) shortens the keys and
    values that every query attends over; it has no parameters, so the weights are those of the plain attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        kv_reduce: nn.Module | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.q_bias: nn.Parameter | None
        self.v_bias: nn.Parameter | None
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kv_reduce = kv_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # Call the qkv module (not F.linear on its weight) so ZeRO-3 gathers the weight for us.
        qkv = self.qkv(x)  # (B, N, 3D)
        if self.q_bias is not None and self.v_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias]).to(qkv.dtype)
        qkv = qkv.view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.kv_reduce is not None:
            k, v = self.kv_reduce(k), self.kv_reduce(v)  # each (B, heads, M, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        kv_reduce: nn.Module | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, kv_reduce=kv_reduce)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _drop_path(rate: float) -> nn.Module:
    if rate <= 0:
        return nn.Identity()
    # timm is imported here, not at the top: importing it loads torchvision and torch._dynamo (~2 s), which
    # every process would pay, pre-training included, where drop path is off.
    from timm.layers import DropPath

    return DropPath(rate)


def trunc_normal(shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
    """A tensor drawn from N(0, std) truncated at one standard deviation, as the reference draws its mask token
    (its pre-training model wraps ``trunc_normal_`` with bounds ``±std``)."""
    return nn.init.trunc_normal_(torch.empty(shape), std=std, a=-std, b=std)


__all__ = [
    "Attention",
    "Block",
    "TubeletEmbed",
    "Linear",
    "Mlp",
    "sincos_table_1d",
    "sincos_table_3d",
    "trunc_normal",
]
