"""The AdaMAE token sampler: one transformer block and a linear head → a categorical over tokens.

By default everything here runs in fp32 even inside a bf16 autocast region: the softmax over ~1.5k
tokens, the Gumbel noise and the log-probabilities that carry the sampling loss are where bf16's 8-bit
mantissa would hurt (a logit gap of 1e-2 is invisible to bf16 at magnitude 4). ``precision`` may make
the block alone cheaper (``SAMPLER_PRECISIONS``); the input sum, head, logits and everything after stay fp32.
The tokens it is given are the shared patch embedding, bf16-rounded under bf16 autocast; fp32 here keeps what
is computed from them exact, not the rounding of the input.

Two measured, opt-in ways to make the block itself cheaper (docs/performance.md has the figures); with
neither, the module is the reference's, parameter for parameter:

- ``width``: the block runs at a narrower width behind a linear projection (half the width: ~4x fewer
  block FLOPs in the linears, 2x fewer in attention);
- ``pool``: the block runs over (pool x pool) spatial cells of tokens, averaged (pool 2: 4x fewer tokens, ~4x
  fewer FLOPs in the linears and 16x in attention); every token's logit is the head of its cell's output plus
  a per-token projection of its own embedding, so tokens of one cell still get their own probabilities;
- ``kv_pool``: every token keeps its own query, residual path and MLP, but its attention reads keys and values
  averaged over (kv_pool x kv_pool) spatial cells (kv_pool 2: 4x fewer keys, 4x fewer attention FLOPs, the
  linears unchanged). The parameters are the plain block's, so the reference's weights load into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import nn

from .layers import Block, Linear

# fp32: the reference numerics. tf32: the block's matmuls in TF32 on CUDA (fp32 elsewhere: CPUs have no TF32).
# bf16: the block's matmuls and attention under bf16 autocast.
SAMPLER_PRECISIONS = ("fp32", "tf32", "bf16")


class TokenSampler(nn.Module):
    """``logits = head(block(x + pos_embed_probs))``: unnormalised log-probabilities ``[B, N]``.

    Structure and initialisation follow the reference ``get_token_probs``: a block of width D with
    8 heads, mlp ratio 4, no qkv bias, LayerNorm eps 1e-5, dropout 0.1 (after the attention projection and
    fc2); ``pos_embed_probs`` starts at zero. ``width``, ``pool`` and ``kv_pool`` (with the token ``grid``)
    select the cheaper blocks of the module docstring.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        num_heads: int = 8,
        dropout: float = 0.1,
        precision: str = "fp32",
        width: int | None = None,
        pool: int = 1,
        grid: tuple[int, int, int] | None = None,
        kv_pool: int = 1,
    ):
        super().__init__()
        if precision not in SAMPLER_PRECISIONS:
            raise ValueError(f"model.sampler_precision must be one of {SAMPLER_PRECISIONS}, got {precision!r}")
        if pool > 1 and (grid is None or grid[1] % pool or grid[2] % pool):
            raise ValueError(f"model.sampler_pool={pool} needs a token grid whose height and width it divides")
        cells = pool * kv_pool
        if kv_pool > 1 and (grid is None or grid[1] % cells or grid[2] % cells):
            raise ValueError(
                f"model.sampler_kv_pool={kv_pool} needs a token grid whose height and width sampler_pool x kv_pool "
                "divides"
            )
        self.precision = precision
        self.pool = pool
        self.grid = grid
        width = width or dim
        if width < 1 or width % num_heads:
            raise ValueError(f"the sampler's width {width} is not a positive multiple of its {num_heads} heads")
        # Narrower than the tokens: a projection in front of the block (absent in the reference sampler).
        self.proj = Linear(dim, width) if width != dim else None
        block_tokens = num_tokens // (pool * pool)
        self.pos_embed_probs = nn.Parameter(torch.zeros(1, block_tokens, width))
        kv_reduce = None
        if kv_pool > 1:
            assert grid is not None
            kv_reduce = CellMean((grid[0], grid[1] // pool, grid[2] // pool), kv_pool)
        self.block = Block(
            width, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=dropout, norm_eps=1e-5, kv_reduce=kv_reduce
        )
        # Pooled: each token's own term, added to its cell's block output before the head.
        self.token_proj = Linear(dim, width) if pool > 1 else None
        self.head = Linear(width, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        device_type = tokens.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = tokens.float()  # (B, N, D) fp32
            with _block_precision(self.precision, device_type):
                if self.pool > 1:
                    x = self._pooled(x)  # (B, N / pool², D)
                if self.proj is not None:
                    x = self.proj(x)  # (B, N', width)
                x = self.block(x.float() + self.pos_embed_probs.float())  # (B, N', width)
                if self.token_proj is not None:
                    x = F.gelu(self._unpooled(x) + self.token_proj(tokens.float()))  # (B, N, width)
            logits = self.head(x.float()).squeeze(-1)  # (B, N)
            # A non-finite logit would poison softmax for the whole clip; the reference zeroes NaNs too.
            return torch.nan_to_num(logits.float(), nan=0.0, posinf=1e4, neginf=-1e4)

    def _cells(self) -> dict[str, int]:
        assert self.grid is not None
        t, h, w = self.grid
        return {"t": t, "h": h // self.pool, "w": w // self.pool, "p1": self.pool, "p2": self.pool}

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return reduce(x, "b (t h p1 w p2) d -> b (t h w) d", "mean", **self._cells())

    def _unpooled(self, x: torch.Tensor) -> torch.Tensor:
        return repeat(x, "b (t h w) d -> b (t h p1 w p2) d", **self._cells())


class CellMean(nn.Module):
    """``(..., t*h*w, d)`` tokens of a (t, h, w) grid → their means over (cell x cell) spatial cells,
    ``(..., t*(h/cell)*(w/cell), d)``, in the same (t, h, w) order."""

    def __init__(self, grid: tuple[int, int, int], cell: int):
        super().__init__()
        t, h, w = grid
        self.sizes = {"t": t, "h": h // cell, "w": w // cell, "p1": cell, "p2": cell}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce(x, "... (t h p1 w p2) d -> ... (t h w) d", "mean", **self.sizes)

    def extra_repr(self) -> str:
        return f"cell={self.sizes['p1']}"


@contextlib.contextmanager
def _block_precision(precision: str, device_type: str) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device_type == "cuda":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    else:
        yield


def token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)`` in fp32, clamped at log(float32 eps) like the reference's clamp on p."""
    floor = float(torch.log(torch.tensor(torch.finfo(torch.float32).eps)))
    return F.log_softmax(logits.float(), dim=-1).clamp(min=floor)
