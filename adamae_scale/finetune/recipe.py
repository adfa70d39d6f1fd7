"""The reference fine-tuning recipe: layer-wise lr decay, mixup/cutmix on clips, label smoothing.

timm provides the pieces (``param_groups_layer_decay``, ``Mixup``, ``SoftTargetCrossEntropy``,
``LabelSmoothingCrossEntropy``); what it lacks is clips: its cutmix box indexes the last two axes of a 4-D
batch, so a ``[B, C, T, H, W]`` clip batch is viewed as ``[B, C·T, H, W]`` — the box then spans (H, W) of every
frame, the same for all frames, and mixup mixes whole clips.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

MODES = ("full", "linear", "attentive")
PROBE_MODES = ("linear", "attentive")  # a frozen encoder: no augmentation, mixup or repeated views


def param_groups(model: nn.Module, mode: str, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups. ``full``: every parameter, lr scaled by ``layer_decay ** (depth + 1 - layer)`` (patch
    embedding 0, block i → i + 1, fc_norm/head last at scale 1), no weight decay on biases and norms.
    ``linear``: the encoder (and ``fc_norm``, kept at its parameter-free initial state) frozen; only ``head``
    trains. ``attentive``: the encoder frozen; the attentive pooler, ``fc_norm`` and ``head`` train. Every group
    follows the cosine schedule."""
    if mode not in MODES:
        raise ValueError(f"finetune.mode={mode!r}: expected one of {MODES}")
    if mode in PROBE_MODES:
        trained = ("head.",) if mode == "linear" else ("pooler.", "fc_norm.", "head.")
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(trained))
        groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    else:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    return [{**group, "schedule": "cosine"} for group in groups if group["params"]]


class ClipMixup:
    """timm's ``Mixup`` (batch mode: one λ and one box per batch, as the reference) on ``[B, C, T, H, W]``."""

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, label_smoothing: float, num_classes: int):
        self.mixup = Mixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            switch_prob=switch_prob,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if video.shape[0] % 2:
            raise ValueError(f"mixup/cutmix need an even micro-batch, got {video.shape[0]}")
        clips = video.clone()
        frames = clips.flatten(1, 2)  # a view: timm mixes it in place, so the clips change with it
        _, target = self.mixup(frames, label)
        return clips, target


def erase_frames(video: torch.Tensor, probability: float) -> torch.Tensor:
    """timm's ``RandomErasing`` (per-pixel normal noise, one box) on every frame of ``[B, C, T, H, W]``
    normalised clips, each frame drawn independently as the reference applies it; returns a new tensor."""
    erase = RandomErasing(probability, mode="pixel", max_count=1, device=str(video.device))
    clips = video.clone()
    for clip in clips:
        erase(clip.transpose(0, 1))  # (T, C, H, W): a batch of frames, erased in place through the view
    return clips


@dataclass
class ClassificationObjective:
    """``loss_fn(model, batch)`` for the trainer: cross-entropy against mixed soft targets (mixup/cutmix on),
    else label-smoothed cross-entropy. ``top1`` of the batch is reported when the labels are not mixed."""

    num_classes: int
    label_smoothing: float = 0.1
    mix: ClipMixup | None = None
    erasing: float = 0.0  # random-erasing probability per frame (timm's RandomErasing, per-pixel noise)

    def __post_init__(self) -> None:
        self.soft = SoftTargetCrossEntropy()
        self.smooth = LabelSmoothingCrossEntropy(self.label_smoothing) if self.label_smoothing > 0 else None

    def __call__(self, model: Callable[..., Any], batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        video, label = batch["video"], batch["label"]
        # timm draws from Python's and numpy's global generators: seed them from the trainer's per-micro-batch
        # torch seed, so a resumed run augments exactly as the uninterrupted one.
        seed = torch.initial_seed() % 2**32
        if self.erasing > 0:
            random.seed(seed)
            video = erase_frames(video, self.erasing)
        if self.mix is not None:
            np.random.seed(seed)
            video, target = self.mix(video, label)
            logits = model(video).float()
            return {"loss": self.soft(logits, target)}
        logits = model(video).float()
        loss = self.smooth(logits, label) if self.smooth is not None else F.cross_entropy(logits, label)
        return {"loss": loss, "top1": (logits.argmax(-1) == label).float().mean()}


__all__ = ["MODES", "PROBE_MODES", "ClassificationObjective", "ClipMixup", "param_groups"]
