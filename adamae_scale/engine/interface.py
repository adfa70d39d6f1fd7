"""What the trainer, the checkpointer and the objectives may use of an engine: the part of DeepSpeed's engine that
the fairscale engine also provides. Typing against it keeps a third engine a matter of implementing this."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainingEngine(Protocol):
    module: nn.Module
    optimizer: Any  # a torch optimizer, possibly wrapped (ZeRO, OSS, the skip-step guard)
    device: torch.device
    global_rank: int
    world_size: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> Any: ...
    def gradient_accumulation_steps(self) -> int: ...
    def train_micro_batch_size_per_gpu(self) -> int: ...
    def is_gradient_accumulation_boundary(self) -> bool: ...
    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str,
        client_state: Mapping[str, Any] | None = None,
        save_latest: bool = True,
    ) -> Any: ...
    def load_checkpoint(self, load_dir: str | os.PathLike[str], tag: str) -> Any: ...
