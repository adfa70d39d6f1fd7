"""Clip-level pixel transforms: pure functions on ``[..., C, T, H, W]`` tensors."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    # Channels sit 4th from the end in [..., C, T, H, W].
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def normalize(video: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``[0, 1]`` pixels → ImageNet-standardised pixels."""
    return (video - _channel_view(mean, video)) / _channel_view(std, video)


def denormalize(video: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """ImageNet-standardised pixels → ``[0, 1]`` pixels."""
    return video * _channel_view(std, video) + _channel_view(mean, video)
