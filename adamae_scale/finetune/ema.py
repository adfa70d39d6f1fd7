"""Model EMA (``finetune.model_ema``): an exponential moving average of the classifier's weights.

timm's ``ModelEmaV3`` does the averaging (foreach ``lerp``; it promotes mixed dtypes in-kernel). It is built
from the fp32 classifier before DeepSpeed wraps it and kept in fp32: under ``precision=bf16`` the engine's
module holds bf16 weights, and a bf16 average would round the ``(1 - decay) · (w - ema)`` updates (1e-4 of a
difference at the default decay) to nothing. Each update reads ``engine.module``'s parameters, which under ZeRO
0-2 are the full, just-stepped weights on every rank (the bf16 copies of the fp32 masters under bf16), so every
rank keeps the same average without communication. ZeRO-3 partitions them: refused before the run starts.

The average is updated after every optimizer step (the reference updates timm's ``ModelEma`` once per
optimizer step, from the start, at a constant decay), travels in the checkpoint's client state as fp32
tensors, and is evaluated in a module of its own (under bf16 autocast when the run is bf16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

if TYPE_CHECKING:
    from ..engine.trainer import Trainer


class ClassifierEma:
    """The fp32 moving average of ``model``'s parameters (buffers are fixed tables: copied, not averaged)."""

    def __init__(self, model: nn.Module, decay: float, autocast: torch.dtype | None = None):
        self.decay = decay
        self.autocast = autocast  # the dtype the evaluation forward runs in (None: fp32)
        self.ema = ModelEmaV3(model, decay=decay, dtype=torch.float32, exclude_buffers=True)
        self.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def to(self, device: torch.device) -> ClassifierEma:
        self.module.to(device)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights: ``ema ← decay · ema + (1 - decay) · w``."""
        self.ema.update(model)

    def step_hook(self, trainer: Trainer, last_step: bool) -> None:
        """A trainer ``StepHook``: runs after each optimizer step, before validation and checkpointing."""
        self.update(trainer.engine.module)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average over at ``model``'s current weights."""
        for ema_p, model_p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.copy_(model_p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, fp32 on the CPU, under the classifier's parameter names."""
        return {name: tensor.detach().float().cpu().clone() for name, tensor in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(dict(state))

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """Logits of the averaged weights (evaluation mode)."""
        self.module.eval()
        dtype, enabled = self.autocast or torch.bfloat16, self.autocast is not None
        with torch.autocast(video.device.type, dtype=dtype, enabled=enabled):
            return self.module(video)


__all__ = ["ClassifierEma"]
