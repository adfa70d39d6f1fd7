"""The picture of what a model does with one clip: one column per frame, one row per view.

Rows, top to bottom:

- ``input``: the clip (ground-truth motion tokens outlined in green, when known);
- ``probability``: the sampler's p over the tokens as a heat map over the frame (adaptive models only;
  a token spans ``tubelet_size`` frames and shows its value on each; scaled to the clip's largest p);
- ``visible``: the tokens the encoder sees; masked ones flat grey;
- ``reconstruction``: visible patches from the input, the decoder's predictions elsewhere, in pixels; with
  decoder masking (``masking.decoder_ratio > 0``), masked tokens the decoder did not reconstruct are black;
- ``error``: each masked token's error (mean squared, in the loss's target space) as a heat map, scaled
  to the clip's largest; visible tokens are 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalized
from .losses import patchify, per_token_error, reconstruction_target
from .models.adamae import AdaMAEConfig, keyed_mask_noise

MASK_MODES = ("topk", "sampled")
GREY = 128  # masked tokens in the visible row
NOT_RECONSTRUCTED = 0  # masked tokens the decoder skipped (decoder masking), in the reconstruction row
OUTLINE = (0, 255, 0)  # ground-truth motion tokens in the input row
HEAT_ALPHA = 0.65  # heat maps over the greyscale frame

# A dark-to-bright ramp (black, violet, red, orange, pale yellow) that stays readable in greyscale.
_RAMP = np.array([[0, 0, 0], [80, 18, 120], [200, 40, 60], [245, 140, 20], [252, 250, 170]], dtype=np.float32)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB ``[..., 3]`` float in [0, 255] along ``_RAMP``."""
    stops = np.linspace(0.0, 1.0, len(_RAMP))
    flat = np.clip(values, 0.0, 1.0).reshape(-1)
    rgb = np.stack([np.interp(flat, stops, _RAMP[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*values.shape, 3)


def token_map(values: np.ndarray, grid: tuple[int, int, int], tubelet: int, patch: int) -> np.ndarray:
    """``[N]`` per-token values → ``[T, H, W]``: each token's value on all its pixels and frames."""
    return values.reshape(grid).repeat(tubelet, 0).repeat(patch, 1).repeat(patch, 2)


@dataclass
class Panel:
    """One clip's views, as numpy arrays (tokens in t, h, w order)."""

    frames: np.ndarray  # (T, H, W, 3) uint8: the input clip
    recon: np.ndarray  # (T, H, W, 3) uint8: visible patches pasted back, predictions elsewhere
    mask: np.ndarray  # (N,) bool, True = masked
    error: np.ndarray  # (N,) float: per-token error of the masked tokens, 0 on visible ones
    probs: np.ndarray | None  # (N,) float: the sampler's p (adaptive models only)
    grid: tuple[int, int, int]  # tokens along (t, h, w)
    tubelet: int
    patch: int
    motion: np.ndarray | None = None  # (N,) bool ground-truth motion tokens, outlined in the input row
    reconstructed: np.ndarray | None = None  # (N,) bool tokens the decoder predicted (None: every masked one)

    def token_map(self, values: np.ndarray) -> np.ndarray:
        return token_map(values, self.grid, self.tubelet, self.patch)

    @property
    def row_names(self) -> list[str]:
        names = ["input", "probability", "visible", "reconstruction", "error"]
        return names if self.probs is not None else [n for n in names if n != "probability"]

    def rows(self) -> list[np.ndarray]:
        """The rows of ``row_names``, each ``[T, H, W, 3]`` uint8."""
        masked = self.token_map(self.mask)[..., None]
        rows = {
            "input": self._outlined(self.frames),
            "visible": np.where(masked, np.uint8(GREY), self.frames),
            "reconstruction": self._skipped_blacked_out(self.recon),
            "error": self._heat(self.error),
        }
        if self.probs is not None:
            rows["probability"] = self._heat(self.probs)
        return [rows[name] for name in self.row_names]

    def image(self) -> np.ndarray:
        """The grid ``[rows × H, T × W, 3]`` uint8: one column per frame."""
        return np.concatenate([np.concatenate(list(row), axis=1) for row in self.rows()], axis=0)

    def animation(self) -> list[np.ndarray]:
        """The rows over time: ``T`` pictures ``[rows × H, W, 3]`` uint8."""
        rows = self.rows()
        return [np.concatenate([row[t] for row in rows], axis=0) for t in range(self.frames.shape[0])]

    def _heat(self, values: np.ndarray) -> np.ndarray:
        top = float(values.max())
        scaled = self.token_map(values / top if top > 0 else values)
        grey = self.frames.astype(np.float32).mean(axis=-1, keepdims=True)
        return np.rint((1 - HEAT_ALPHA) * grey + HEAT_ALPHA * heat_colours(scaled)).astype(np.uint8)

    def _skipped_blacked_out(self, recon: np.ndarray) -> np.ndarray:
        if self.reconstructed is None:
            return recon
        skipped = self.token_map(self.mask & ~self.reconstructed)[..., None]
        return np.where(skipped, np.uint8(NOT_RECONSTRUCTED), recon)

    def _outlined(self, frames: np.ndarray) -> np.ndarray:
        if self.motion is None or not self.motion.any():
            return frames
        out = frames.copy()
        t, h, w = self.grid
        for index in np.flatnonzero(self.motion):
            ti, hi, wi = np.unravel_index(index, (t, h, w))
            time = slice(ti * self.tubelet, (ti + 1) * self.tubelet)
            top, left = hi * self.patch, wi * self.patch
            bottom, right = top + self.patch - 1, left + self.patch - 1
            out[time, top, left : right + 1] = OUTLINE
            out[time, bottom, left : right + 1] = OUTLINE
            out[time, top : bottom + 1, left] = OUTLINE
            out[time, top : bottom + 1, right] = OUTLINE
        return out


def mask_noise(cfg: AdaMAEConfig, mode: str, seed: int, index: int) -> dict[str, torch.Tensor]:
    """The model's noise arguments (``noise [1, N]``, and ``decoder_noise`` with decoder masking) for clip ``index``.

    ``topk`` (adaptive models): the same value for every token, so the Gumbel perturbation is a constant and
    Gumbel-top-k picks exactly the k most probable tokens, in the one forward pass. ``sampled``, and every
    mode of random/tube models: the noise of sample ``index`` under ``seed``, as training keys it. The
    decoder's targets are always drawn as training draws them.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    noise = keyed_mask_noise(cfg, torch.tensor([index]), seed)
    if mode == "topk" and cfg.masking == "adaptive":
        noise["noise"] = torch.full((1, cfg.num_tokens), 0.5)
    return noise


def predicted_pixels(pred: torch.Tensor, input_tokens: torch.Tensor, target: str) -> torch.Tensor:
    """Predictions ``[M, P*C]`` in the loss's target space → pixels in [0, 1] ``[M, P, C]``.

    ``norm_pix`` predictions are per-token standardised: de-standardise them with the input token's own
    per-channel mean and std (``input_tokens`` ``[M, P, C]`` in [0, 1]), as VideoMAE's visualisation does."""
    pred = pred.float().view(input_tokens.shape)
    if target == "norm_pix":
        mean = input_tokens.mean(dim=1, keepdim=True)
        std = input_tokens.std(dim=1, unbiased=True, keepdim=True)
        pixels = pred * (std + 1e-6) + mean
    else:
        pixels = pred * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    return pixels.clamp(0.0, 1.0)


@torch.no_grad()
def compute_panel(
    model: Callable[..., Any],
    cfg: AdaMAEConfig,
    clip: torch.Tensor,
    mode: str = "topk",
    seed: int = 0,
    index: int = 0,
    target: str = "norm_pix",
    device: torch.device | str = "cpu",
    motion: torch.Tensor | None = None,
) -> Panel:
    """Run ``model`` (an ``AdaMAE`` or its DeepSpeed engine, in eval mode) on ``clip`` (``[3, T, H, W]``
    uint8) with the mask of ``mask_noise(cfg, mode, seed, index)``; one forward pass, so under ZeRO-3 every
    rank calls this with the same clip."""
    video = normalized(clip)[None].to(device)  # (1, 3, T, H, W)
    out = model(video, **{name: noise.to(device) for name, noise in mask_noise(cfg, mode, seed, index).items()})
    mask = out.mask[0].cpu()
    masked_idx = out.masked_idx[0].cpu()
    pred = out.pred[0].float().cpu()  # (M, P*C)

    targets = reconstruction_target(video, cfg.tubelet_size, cfg.patch_size, target)[0].cpu()  # (N, P*C)
    error = torch.zeros(cfg.num_tokens)
    error[masked_idx] = per_token_error(pred, targets[masked_idx])

    tokens = patchify(clip[None].float() / 255.0, cfg.tubelet_size, cfg.patch_size)[0]  # (N, P, C) in [0, 1]
    tokens[masked_idx] = predicted_pixels(pred, tokens[masked_idx], target)
    t, h, w = cfg.layout.grid
    recon = rearrange(
        tokens,
        "(t h w) (p0 p1 p2) c -> (t p0) (h p1) (w p2) c",
        t=t,
        h=h,
        w=w,
        p0=cfg.tubelet_size,
        p1=cfg.patch_size,
        p2=cfg.patch_size,
    )
    frames = clip.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    predicted = (recon * 255.0).round().to(torch.uint8).numpy()
    masked_pixels = token_map(mask.numpy(), (t, h, w), cfg.tubelet_size, cfg.patch_size)[..., None]
    reconstructed = np.zeros(cfg.num_tokens, dtype=bool)
    reconstructed[masked_idx.numpy()] = True
    return Panel(
        frames=frames,
        recon=np.where(masked_pixels, predicted, frames),  # visible patches exactly as in the input
        mask=mask.numpy(),
        error=error.numpy(),
        probs=None if out.logits is None else torch.softmax(out.logits[0].float(), dim=-1).cpu().numpy(),
        grid=(t, h, w),
        tubelet=cfg.tubelet_size,
        patch=cfg.patch_size,
        motion=None if motion is None else motion.bool().cpu().numpy(),
        reconstructed=reconstructed if cfg.decoder_ratio > 0 else None,
    )


__all__ = ["MASK_MODES", "Panel", "compute_panel", "heat_colours", "mask_noise", "predicted_pixels", "token_map"]
