"""The ImageNet normalisation of clips, for the data that feeds the model and the losses and pictures that
read its input back: one module both sides use. Functions on ``[..., C, T, H, W]`` tensors.

``normalize`` makes a new tensor, ``normalize_`` works in place (the same values without two more copies of a
batch), ``normalized`` takes a uint8 clip straight to normalised float in one pass (a data loader's path) and
``denormalize`` goes back to ``[0, 1]`` pixels.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    # Channels sit 4th from the end in [..., C, T, H, W].
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def normalize(
    video: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """``[0, 1]`` pixels → ImageNet-standardised pixels."""
    return (video - _channel_view(mean, video)) / _channel_view(std, video)


def normalize_(
    video: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """``normalize`` in place, the same values without two more copies of the batch."""
    return video.sub_(_channel_view(mean, video)).div_(_channel_view(std, video))


def denormalize(
    video: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """ImageNet-standardised pixels → ``[0, 1]`` pixels."""
    return video * _channel_view(std, video) + _channel_view(mean, video)


def normalized(clip: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[3, T, h, w]`` → ImageNet-normalised float, written into ``out`` when given (e.g. a slot of
    a batch in shared memory, which saves a copy)."""
    if out is None:
        out = torch.empty(clip.shape, dtype=torch.float32)
    out.copy_(clip)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return out.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # = normalize(clip / 255)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "normalize", "normalize_", "normalized"]
