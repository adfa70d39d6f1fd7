"""Which tokens the encoder sees: score every token, keep the top-scoring ones.

All strategies end in the same place (the MAE idiom): per-token scores → the ``num_visible``
highest → sorted visible indices and a boolean mask (True = masked). They differ only in where
the scores come from:

- ``random``: uniform noise (MAE/VideoMAE random masking);
- ``tube``: uniform noise per spatial position, shared by every time step (VideoMAE tube masking);
- ``adaptive``: the sampler's logits plus Gumbel noise. Top-k of ``logits + Gumbel`` is an exact
  draw of k tokens *without replacement* from ``softmax(logits)`` (Gumbel-top-k), vectorised over
  the batch, where the reference calls ``torch.multinomial`` per row.

Decoder masking (VideoMAE V2's "dual masking", for every strategy): the decoder reconstructs only a
fixed-size subset of the encoder-masked tokens (``decoder_targets``), drawn independently of the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("adaptive", "random", "tube")
# Which encoder-masked tokens the decoder reconstructs when masking.decoder_ratio > 0.
DECODER_MASKS = ("running_cell", "random")
# running_cell tiles the spatial grid with 2x2 cells, 2 of whose 4 slots are reconstructed.
CELL_SLOTS = 4


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
    return keyed_noise(sample_ids, (num_tokens,), seed)[0]


def keyed_noise(sample_ids: torch.Tensor, widths: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """One uniform noise tensor ``[B, width]`` per entry of ``widths``, drawn in turn from one generator per
    sample keyed by ``(seed, sample_ids[b])``: the first is ``noise_for_samples``' (the encoder's mask), the
    next ones (the decoder's targets) come after it from the same stream."""
    per_sample = []
    for i in sample_ids.tolist():
        generator = torch.Generator().manual_seed((seed * 1_000_003 + int(i)) % (2**63))
        per_sample.append([torch.rand(width, generator=generator) for width in widths])
    return [torch.stack([rows[k] for rows in per_sample]).to(sample_ids.device) for k in range(len(widths))]


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


def num_reconstructed_tokens(num_masked: int, decoder_ratio: float) -> int:
    """How many of the ``num_masked`` encoder-masked tokens the decoder reconstructs: all of them at
    ``decoder_ratio`` 0, else ``num_masked - int(decoder_ratio * num_masked)`` (the same count in every clip)."""
    if not 0.0 <= decoder_ratio < 1.0:
        raise ValueError(f"masking.decoder_ratio must be in [0, 1), got {decoder_ratio}")
    return num_masked - int(decoder_ratio * num_masked)


def check_decoder_mask(pattern: str, decoder_ratio: float) -> None:
    """``masking.decoder_mask`` and ``masking.decoder_ratio`` go together: ``running_cell`` is VideoMAE V2's cell
    with 2 of its 4 slots reconstructed, so it needs ratio 0.5 (0 = decoder masking off)."""
    if pattern not in DECODER_MASKS:
        raise ValueError(f"masking.decoder_mask must be one of {DECODER_MASKS}, got {pattern!r}")
    if pattern == "running_cell" and decoder_ratio not in (0.0, 0.5):
        # At 0.25 or 0.75 the fill-up step makes some masked tokens likelier targets than others (measured: up to
        # 1.7% off), which would bias the sampling loss; 0.5 is exact (decoder_targets).
        raise ValueError(
            f"masking.decoder_mask=running_cell reconstructs 2 of every 4 positions: it needs "
            f"masking.decoder_ratio=0.5, got {decoder_ratio} (masking.decoder_mask=random takes any ratio)"
        )


def running_cell_pattern(grid: tuple[int, int, int], phase: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool, True where the running cell lets the decoder reconstruct, for ``phase [B]`` in 0..3.

    The spatial grid is tiled with 2x2 cells; slot s of a cell (cyclic order (0,0) (0,1) (1,1) (1,0)) is kept
    at frame t when ``(s - phase - t) mod 4 < 2``: two neighbouring slots, moving on by one slot every frame.
    Phases p and p + 2 keep complementary halves, so over the four phases every position is kept half the time.
    """
    t, h, w = grid
    device = phase.device
    row = torch.arange(h, device=device)[:, None] % 2  # (h, 1)
    col = torch.arange(w, device=device)[None, :] % 2  # (1, w)
    slot = 2 * row + (row ^ col)  # (h, w): 0 1 / 3 2 within a cell
    frame = torch.arange(t, device=device)[:, None, None]  # (t, 1, 1)
    shifted = (slot[None] - frame)[None] - phase[:, None, None, None]  # (B, t, h, w)
    return (shifted.remainder(CELL_SLOTS) < CELL_SLOTS // 2).reshape(phase.shape[0], t * h * w)


def decoder_targets(
    mask: torch.Tensor,
    grid: tuple[int, int, int],
    count: int,
    pattern: str,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices ``[B, count]`` (ascending) of the encoder-masked tokens the decoder reconstructs.

    ``mask [B, N]``: the encoder's mask (True = masked). ``noise``: optional uniform(0, 1) noise ``[B, N + 1]``,
    the only randomness used (drawn when absent): column 0 picks the running cell's phase, the rest rank tokens.

    - ``random``: a uniformly random ``count``-subset of each clip's masked tokens;
    - ``running_cell``: the masked tokens inside the running cell first, then, when the cell holds more or fewer
      than ``count`` of them, a uniformly random choice among them (or among the rest) to make every clip's
      set the same size. With ``count = N_masked / 2`` (ratio 0.5, an even N_masked) each masked token is
      reconstructed with probability exactly 1/2 over the phases whatever the encoder's mask (complementary
      phases hold complementary halves), which keeps the sampling loss unbiased (``losses.sampling_loss``).
    """
    if pattern not in DECODER_MASKS:
        raise ValueError(f"masking.decoder_mask must be one of {DECODER_MASKS}, got {pattern!r}")
    batch, n = mask.shape
    if noise is None:
        noise = torch.rand(batch, n + 1, device=mask.device)
    noise = noise.float()
    priority = noise[:, 1:].clone()  # (B, N) in [0, 1)
    if pattern == "running_cell":
        phase = (noise[:, 0] * CELL_SLOTS).long().clamp(max=CELL_SLOTS - 1)  # (B,)
        priority += running_cell_pattern(grid, phase).float()
    priority = priority.masked_fill(~mask, -1.0)  # visible tokens are never targets
    chosen = torch.topk(priority, count, dim=-1, sorted=False).indices
    return torch.sort(chosen, dim=-1).values
