"""Which tokens the encoder sees: score every token, keep the top-scoring ones.

All strategies end in the same place (the MAE idiom): per-token scores → the ``num_visible``
highest → sorted visible indices and a boolean mask (True = masked). They differ only in where
the scores come from:

- ``random``: uniform noise (MAE/VideoMAE random masking);
- ``tube``: uniform noise per spatial position, shared by every time step (VideoMAE tube masking);
- ``adaptive``: the sampler's logits plus Gumbel noise. Top-k of ``logits + Gumbel`` is an exact
  draw of k tokens *without replacement* from ``softmax(logits)`` (Gumbel-top-k), vectorised over
  the batch, where the reference calls ``torch.multinomial`` per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("adaptive", "random", "tube")


@dataclass(frozen=True)
class TokenLayout:
    """Token grid of one clip: (time, height, width) in tokens, ordered t, h, w when flattened."""

    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


def num_visible_tokens(strategy: str, layout: TokenLayout, mask_ratio: float) -> int:
    """How many tokens the encoder sees. ``int(N * (1 - ratio))`` as in AdaMAE; tube masking masks
    ``int(ratio * h * w)`` positions per frame, as VideoMAE's tube generator does."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"masking.ratio must be in (0, 1), got {mask_ratio}")
    t, h, w = layout.grid
    if strategy == "tube":
        visible = t * (h * w - int(mask_ratio * h * w))
    else:
        visible = int(layout.num_tokens * (1.0 - mask_ratio))
    if visible < 1:
        raise ValueError(f"masking.ratio={mask_ratio} leaves no visible token of {layout.num_tokens}")
    return visible


def gumbel_top_k(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, k]`` of k draws without replacement from ``softmax(logits)`` (fp32).

    ``noise``: optional uniform(0, 1) noise ``[B, N]`` (drawn here when not given).
    """
    if noise is None:
        noise = torch.rand(logits.shape, dtype=torch.float32, device=logits.device)
    # -log(-log(U)) with U kept away from 0 and 1 so the noise is always finite.
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(noise.float().clamp(min=tiny, max=1.0 - 1e-7)))
    return torch.topk(logits.float() + gumbel, k, dim=-1, sorted=False).indices


def noise_for_samples(sample_ids: torch.Tensor, num_tokens: int, seed: int) -> torch.Tensor:
    """Uniform noise ``[B, N]`` where row b depends only on ``(seed, sample_ids[b])``.

    Keyed by a sample's position in the global stream, a clip gets the same mask whatever the world
    size, micro-batch split or rank that processes it.
    """
    rows = [
        torch.rand(num_tokens, generator=torch.Generator().manual_seed((seed * 1_000_003 + int(i)) % (2**63)))
        for i in sample_ids.tolist()
    ]
    return torch.stack(rows).to(sample_ids.device)


def mask_from_visible(visible_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean mask ``[B, N]`` (True = masked) from visible indices ``[B, k]``."""
    mask = torch.ones(visible_idx.shape[0], num_tokens, dtype=torch.bool, device=visible_idx.device)
    return mask.scatter(1, visible_idx, False)


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible_idx [B, k], masked_idx [B, N-k])``, each ascending, from a mask with the same count
    of visible tokens in every row."""
    visible_counts = (~mask).sum(dim=1)
    if not torch.all(visible_counts == visible_counts[0]):
        raise ValueError("every clip in a batch must have the same number of visible tokens")
    num_visible = int(visible_counts[0])
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, each part ascending
    return order[:, :num_visible], order[:, num_visible:]


def sample_mask(
    strategy: str,
    layout: TokenLayout,
    num_visible: int,
    batch_size: int,
    device: torch.device,
    logits: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """A mask ``[B, N]`` (True = masked) drawn by ``strategy``; ``logits [B, N]`` for ``adaptive``.

    ``noise``: optional uniform(0, 1) noise ``[B, N]``, the only randomness used (drawn when absent).
    """
    n = layout.num_tokens
    if noise is None:
        noise = torch.rand(batch_size, n, device=device)
    if strategy == "adaptive":
        if logits is None:
            raise ValueError("adaptive masking needs the sampler's logits")
        visible_idx = gumbel_top_k(logits, num_visible, noise)
    elif strategy == "random":
        visible_idx = torch.topk(noise, num_visible, dim=-1, sorted=False).indices
    elif strategy == "tube":
        t, h, w = layout.grid
        per_frame = num_visible // t
        spatial = torch.topk(noise[:, : h * w], per_frame, dim=-1, sorted=False).indices  # (B, per_frame)
        frame_offsets = torch.arange(t, device=device)[None, :, None] * (h * w)  # (1, t, 1)
        visible_idx = (spatial[:, None, :] + frame_offsets).reshape(batch_size, -1)  # (B, t*per_frame)
    else:
        raise ValueError(f"masking.strategy must be one of {STRATEGIES}, got {strategy!r}")
    return mask_from_visible(visible_idx, n)
