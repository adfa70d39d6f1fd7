"""The attentive probe's pooler: learned queries cross-attend over every output token of a frozen encoder.

The evaluation protocol of V-JEPA (arXiv 2404.08471): a linear probe reads the mean of the tokens, which
throws away where and when things happen; the attentive probe lets a few learned queries choose what to read.
One cross-attention block, pre-norm like the encoder's blocks:

    q ← queries + proj(attention(wq · queries, wk · norm(x), wv · norm(x)))
    q ← q + mlp(norm_mlp(q))

and the pooled feature is the mean over the queries (one query by default). The keys are normalised here, so the
encoder's final LayerNorm (dropped by the classifier) is not needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear, Mlp


@dataclass(frozen=True)
class AttentiveSpec:
    """The pooler's shape: ``queries`` learned query tokens, ``num_heads`` attention heads."""

    queries: int = 1
    num_heads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AttentiveSpec:
        return cls(queries=int(values["queries"]), num_heads=int(values["num_heads"]))


class AttentivePooler(nn.Module):
    """``tokens [B, N, D]`` → pooled ``[B, D]``."""

    def __init__(self, dim: int, spec: AttentiveSpec, mlp_ratio: float = 4.0):
        super().__init__()
        if spec.queries < 1:
            raise ValueError(f"attentive pooler: queries={spec.queries}, expected at least 1")
        if dim % spec.num_heads:
            raise ValueError(f"attentive pooler: width {dim} is not divisible by num_heads={spec.num_heads}")
        self.num_heads = spec.num_heads
        self.queries = nn.Parameter(torch.zeros(1, spec.queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = tokens.shape
        heads, width = self.num_heads, dim // self.num_heads
        x = self.norm(tokens)  # (B, N, D)
        k, v = self.kv(x).unflatten(-1, (2, heads, width)).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        query = self.queries.expand(batch, -1, -1).to(x.dtype)  # (B, Q, D)
        q = self.q(query).unflatten(-1, (heads, width)).transpose(1, 2)  # (B, h, Q, d)
        read = F.scaled_dot_product_attention(q, k, v)  # (B, h, Q, d)
        out = query + self.proj(read.transpose(1, 2).flatten(2))  # (B, Q, D)
        out = out + self.mlp(self.norm_mlp(out))
        return out.mean(dim=1)  # (B, D)


__all__ = ["AttentivePooler", "AttentiveSpec"]
