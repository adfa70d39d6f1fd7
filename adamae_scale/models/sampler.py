"""The AdaMAE token sampler: one transformer block and a linear head → a categorical over tokens.

By default everything here runs in fp32 even inside a bf16 autocast region: the softmax over ~1.5k
tokens, the Gumbel noise and the log-probabilities that carry the sampling loss are where bf16's 8-bit
mantissa would hurt (a logit gap of 1e-2 is invisible to bf16 at magnitude 4). ``precision`` may make
the block alone cheaper (``SAMPLER_PRECISIONS``); the input sum, head, logits and everything after stay fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, Linear

# fp32: the reference numerics. tf32: the block's matmuls in TF32 on CUDA (fp32 elsewhere: CPUs have no TF32).
# bf16: the block's matmuls and attention under bf16 autocast.
SAMPLER_PRECISIONS = ("fp32", "tf32", "bf16")


class TokenSampler(nn.Module):
    """``logits = head(block(x + pos_embed_probs))``: unnormalised log-probabilities ``[B, N]``.

    Structure and initialisation follow the reference ``get_token_probs``: a block of width D with
    8 heads, mlp ratio 4, no qkv bias, LayerNorm eps 1e-5, dropout 0.1; ``pos_embed_probs`` starts
    at zero.
    """

    def __init__(self, dim: int, num_tokens: int, num_heads: int = 8, dropout: float = 0.1, precision: str = "fp32"):
        super().__init__()
        if precision not in SAMPLER_PRECISIONS:
            raise ValueError(f"model.sampler_precision must be one of {SAMPLER_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.pos_embed_probs = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.block = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=dropout, norm_eps=1e-5)
        self.head = Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        device_type = tokens.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = tokens.float() + self.pos_embed_probs.float()  # (B, N, D) fp32
            with _block_precision(self.precision, device_type):
                x = self.block(x)  # (B, N, D)
            logits = self.head(x.float()).squeeze(-1)  # (B, N)
            # A non-finite logit would poison softmax for the whole clip; the reference zeroes NaNs too.
            return torch.nan_to_num(logits.float(), nan=0.0, posinf=1e4, neginf=-1e4)


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
