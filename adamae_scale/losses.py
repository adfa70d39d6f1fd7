"""Reconstruction and sampling losses of AdaMAE, vectorised over the batch and computed in fp32.

- Target: per token and channel, the clip's pixels standardised over the token's pixels
  (``norm_pix``, the reference), or the input's globally standardised pixels (``pixel``).
- ``e[b, j]``: mean squared error over the token's pixels, for every masked token j.
- ``L_r = mean_{b, j} e[b, j]``.
- ``L_s = -(1/B) sum_b (1/N_m) sum_{j masked} log p[b, j] * stopgrad(e[b, j])`` (REINFORCE-style:
  hard-to-reconstruct masked tokens become more likely to be visible next time).
- ``L = L_r + lambda * L_s``.

With decoder masking (``masking.decoder_ratio > 0``) the decoder reconstructs a fixed-size subset R of the
masked tokens, and both sums run over R instead (``masked_idx`` holds R): see ``sampling_loss`` for why the
mean over R is the right normalisation.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

TARGETS = ("norm_pix", "pixel")


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B, N, tubelet*patch*patch, C]`` with tokens in (t, h, w) order."""
    return rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch)


def reconstruction_target(
    video: torch.Tensor,
    tubelet: int,
    patch: int,
    target: str = "norm_pix",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Per-token targets ``[B, N, tubelet*patch*patch*C]`` (channel innermost) from normalised video."""
    video = video.float()
    if target == "norm_pix":
        tokens = patchify(denormalize(video, mean, std), tubelet, patch)  # (B, N, P, C) in [0, 1]
        tokens = (tokens - tokens.mean(dim=-2, keepdim=True)) / (tokens.std(dim=-2, unbiased=True, keepdim=True) + 1e-6)
    elif target == "pixel":
        tokens = patchify(video, tubelet, patch)  # (B, N, P, C) globally standardised
    else:
        raise ValueError(f"loss.target must be one of {TARGETS}, got {target!r}")
    return tokens.flatten(2)  # (B, N, P*C)


def per_token_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``e [B, N_m]``: mean over pixels of ``(pred - target)^2``, in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def sampling_loss(log_probs: torch.Tensor, masked_idx: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``-mean_{b, j in masked_idx} log p[b, j] * stopgrad(e[b, j])``; every row has the same count.

    ``masked_idx`` is every masked token, or, with decoder masking, the subset R_b the decoder reconstructed. R_b
    has a fixed size n_R and is drawn independently of the sampler with every masked token equally likely to be
    in it (probability n_R / N_m: ``masking.decoder_targets``), so ``E_R[(1/n_R) sum_{j in R} a_j] =
    (1/N_m) sum_{j masked} a_j`` for any per-token values a_j: the mean over R is an unbiased estimate of the
    full-set loss and of its gradient (for fixed errors), with the same scale, so λ keeps its meaning. A sum
    over R, or a mean over all N_m, would shrink it by n_R / N_m instead.
    """
    masked_log_probs = torch.gather(log_probs.float(), 1, masked_idx)  # (B, N_m)
    return -(masked_log_probs * error.detach()).mean()


def adamae_loss(
    video: torch.Tensor,
    pred: torch.Tensor,
    masked_idx: torch.Tensor,
    log_probs: torch.Tensor | None,
    tubelet: int,
    patch: int,
    target: str = "norm_pix",
    sampling_weight: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """``{"loss", "loss_rec", "loss_sampling", "token_error"}``; ``loss_sampling`` is 0 without a sampler."""
    targets = reconstruction_target(video, tubelet, patch, target)  # (B, N, P*C)
    masked_targets = torch.gather(targets, 1, masked_idx.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
    error = per_token_error(pred, masked_targets)  # (B, N_m)
    loss_rec = error.mean()
    if log_probs is None:
        loss_sampling = torch.zeros((), device=pred.device)
    else:
        loss_sampling = sampling_loss(log_probs, masked_idx, error)
    return {
        "loss": loss_rec + sampling_weight * loss_sampling,
        "loss_rec": loss_rec,
        "loss_sampling": loss_sampling,
        "token_error": error.detach(),
    }
