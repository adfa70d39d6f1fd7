"""Non-finite steps: skip them inside the optimizer, so weights and optimizer state stay untouched.

The check sits in the optimizer's ``step`` because that is the one place every engine (DeepSpeed ZeRO 0-3,
fairscale OSS) calls with the final, reduced, clipped gradients of this rank's parameters, and only at an
accumulation boundary. Every rank takes the same decision: the flag is all-reduced (max) first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..base.collectives import any_rank


def all_finite(tensors: Iterable[torch.Tensor]) -> tuple[bool, torch.device | None]:
    """Whether every tensor is free of NaN/inf, and their device. The max-norm (largest magnitude, NaN
    propagating) cannot overflow, so huge but finite values count as finite."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True, None
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"), error_if_nonfinite=False)
    return bool(torch.isfinite(norm)), tensors[0].device


class NonFiniteGuard:
    """Mixin for a ``torch.optim.Optimizer``: ``step`` does nothing when any rank's gradients hold NaN/inf,
    or while ``refuse`` is set (the trainer sets it around an engine step whose loss was not finite: ZeRO-1/2/3
    call ``step`` once per parameter group or sub-group, and every call must be refused).

    ``calls`` and ``skipped`` count the steps the engine asked for and the ones refused; the trainer compares
    ``calls`` before and after an optimizer step to see a step the engine itself discarded (DeepSpeed ZeRO-1/2
    drop a step whose gradient norm is not finite before calling the optimizer).
    """

    calls: int = 0
    skipped: int = 0
    refuse: bool | torch.Tensor = False  # a 0-dim bool tensor is read only here, at the step (no earlier sync)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]  # type: ignore[attr-defined]
        finite, device = all_finite(grads)
        if any_rank(bool(self.refuse) or not finite, device):
            self.skipped += 1
            return None
        return super().step(*args, **kwargs)  # type: ignore[misc]


class GuardedAdamW(NonFiniteGuard, torch.optim.AdamW):
    """``torch.optim.AdamW`` that skips non-finite steps."""


@functools.cache
def _guarded_cpu_adam_class() -> type:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return type("GuardedCPUAdam", (NonFiniteGuard, DeepSpeedCPUAdam), {})


def guarded_cpu_adam(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam (ZeRO optimizer offload) that skips non-finite steps."""
    return _guarded_cpu_adam_class()(*args, **kwargs)


def find_guard(optimizer: Any) -> NonFiniteGuard | None:
    """The ``NonFiniteGuard`` inside an engine's optimizer wrappers (ZeRO optimizers, fairscale OSS)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, NonFiniteGuard):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
        seen += 1
    return None


def owned_values(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this rank holds: under ZeRO-3 its partition (``ds_tensor``) without the padding that
    ends the last partitions, which DeepSpeed allocates with ``torch.empty`` and never writes (so it may hold
    NaN bit patterns); otherwise the whole tensor."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param.detach()
    import torch.distributed as dist

    partition_rank = dist.get_rank(group=getattr(param, "ds_process_group", None))  # this rank in the param's group
    size = part.numel()
    held = min(size, max(0, int(param.ds_numel) - size * partition_rank))  # type: ignore[attr-defined]
    return part.detach().narrow(0, 0, held)


def weights_finite(module: nn.Module) -> bool:
    """Whether every rank's weights are finite (ZeRO-3: each rank checks the values of its own partition)."""
    local = [owned_values(p) for p in module.parameters()]
    finite, device = all_finite(local)
    return not any_rank(not finite, device)
