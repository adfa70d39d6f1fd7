"""The reference optimisation recipe: AdamW with weight-decay groups, lr scaled by batch, per-step
linear warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from . import setup
from .guard import GuardedAdamW, guarded_cpu_adam

# Parameters the reference exempts from weight decay by name (besides every bias and norm).
NO_WEIGHT_DECAY = ("mask_token",)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """``lr = base_lr * global_batch / 256`` (the MAE/VideoMAE/AdaMAE linear scaling rule)."""
    return base_lr * global_batch / 256


def lr_at(step: int, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 over ``warmup_steps`` optimizer steps, then half-cosine to ``min_lr``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The run's learning rate per optimizer step: linear warm-up over ``warmup_steps``, then half-cosine from
    ``peak_lr`` to ``min_lr`` at ``total_steps``. Parameter groups marked ``schedule="constant"``
    (``train.constant_lr_params``) warm up alike, then hold the peak."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def scaled(cls, base_lr: float, min_lr: float, global_batch: int, warmup_fraction: float, steps: int) -> Schedule:
        """``train.*`` lrs scaled by ``global_batch`` (``scaled_lr``), warm-up as a share of ``steps``."""
        return cls(
            scaled_lr(base_lr, global_batch), scaled_lr(min_lr, global_batch), round(warmup_fraction * steps), steps
        )

    def lr(self, step: int) -> float:
        """The lr of step ``step`` (0-based): what most groups use and what the metrics log."""
        return lr_at(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)

    def group_lrs(self, step: int) -> dict[str, float]:
        """The lr of each kind of parameter group at ``step``: ``cosine`` (``lr``) and ``constant``."""
        return {
            "cosine": self.lr(step),
            "constant": lr_at(step, self.peak_lr, self.peak_lr, self.warmup_steps, self.total_steps),
        }

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every param group's lr for ``step`` (its ``schedule`` kind times its ``lr_scale``)."""
        set_lr(optimizer, self.group_lrs(step))


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    cpu_offload: bool = False,
    constant_lr_prefixes: Iterable[str] = (),
) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices, none on biases, norms and ``mask_token``.

    Parameters whose names start with one of ``constant_lr_prefixes`` get their own groups marked
    ``schedule="constant"`` (warm-up, then the peak lr held); the others follow ``"cosine"``.
    A step whose gradients hold NaN/inf on any rank is skipped (``guard.NonFiniteGuard``).
    With ZeRO optimizer offload the update runs on the CPU: next to GPUs in DeepSpeed's CPU Adam, the
    implementation its offload path is tuned for (C++, compiled once on first use); in a CPU-only run in
    torch's fused AdamW, measured as fast (0.055 s per 102M-parameter update on 2 threads) and with
    nothing to compile.
    """
    from timm.optim import param_groups_weight_decay  # a lazy import: see models.layers._drop_path

    prefixes = tuple(constant_lr_prefixes)
    subsets = [("cosine", _ParamSubset(model, lambda name: not name.startswith(prefixes)))]
    if prefixes:
        subsets.append(("constant", _ParamSubset(model, lambda name: name.startswith(prefixes))))
    groups = [
        {**group, "schedule": schedule}
        for schedule, subset in subsets
        # timm reads only named_parameters(), which the subset provides.
        for group in param_groups_weight_decay(
            cast(nn.Module, subset), weight_decay=weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY
        )
        if group["params"]
    ]
    return adamw(groups, lr, betas, eps, cpu_offload)


def adamw(
    groups: list[dict], lr: float, betas: Iterable[float], eps: float, cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over prepared param ``groups`` (each may carry ``weight_decay``, ``lr_scale``, ``schedule``) that
    skips non-finite steps; under ZeRO optimizer offload next to a GPU, DeepSpeed's CPU Adam (see ``build_adamw``)."""
    beta1, beta2 = betas
    beta_pair = (float(beta1), float(beta2))
    if cpu_offload and setup.accelerator() != "cpu":
        return guarded_cpu_adam(groups, lr=lr, betas=beta_pair, eps=eps, adamw_mode=True)
    return GuardedAdamW(groups, lr=lr, betas=beta_pair, eps=eps, fused=fused_supported(groups))


def fused_supported(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter: floating point, on a device it has the kernel for.
    On the CPU it is ~5x faster than the default for-loop (ViT-B: 0.09 against 0.45 s per update) and the same
    math to float rounding; on CUDA it is the fastest too."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


class _ParamSubset:
    """The ``named_parameters`` of a module, filtered by name (what timm's grouping helper reads)."""

    def __init__(self, module: nn.Module, keep: Callable[[str], bool]):
        self.module, self.keep = module, keep

    def named_parameters(self):
        return ((n, p) for n, p in self.module.named_parameters() if self.keep(n))


def set_lr(optimizer: torch.optim.Optimizer, lrs: dict[str, float]) -> None:
    """Set each param group's lr from ``lrs[group["schedule"]]``."""
    for group in optimizer.param_groups:
        group["lr"] = lrs[group.get("schedule", "cosine")] * group.get("lr_scale", 1.0)
