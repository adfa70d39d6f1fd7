"""What a step could do: the FLOPs it executes, attention included on every device, and the matmul peak.

torch's ``FlopCounterMode`` has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but
none for the CPU one that ``F.scaled_dot_product_attention`` dispatches to
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, torch 2.14), so on the CPU it counts 0:
a ViT-B AdaMAE step read 186 GFLOP instead of ~254. ``flop_counter`` adds torch's own CUDA formulas for the
CPU ops, so both devices count the same thing: forward ``4·B·H·Nq·Nk·Dh`` (QKᵀ and PV), backward 2.5× that
(QKᵀ recomputed, then dV, dP, dQ, dK: five matmuls of the forward's size).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _attention_forward_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flop(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Attention ops torch leaves uncounted, with the formula of their CUDA counterparts (same argument order:
# query, key, value first; grad_out, query, key, value for the backward).
CPU_ATTENTION_FORMULAS: dict[Any, Any] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flop,
}

# Every op whose count is attention, to report it apart from the rest.
ATTENTION_OPS = frozenset(
    [
        *CPU_ATTENTION_FORMULAS,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_cudnn_attention,
        aten._scaled_dot_product_cudnn_attention_backward,
        aten._flash_attention_forward,
        aten._flash_attention_backward,
        aten._efficient_attention_forward,
        aten._efficient_attention_backward,
    ]
)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts the CPU attention kernels. A local mapping, not
    ``register_flop_formula``: nothing global changes, and a later torch that counts them itself still works."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)


def attention_flops(counter: FlopCounterMode) -> int:
    """The part of ``counter``'s total that attention kernels executed."""
    return sum(count for op, count in counter.get_flop_counts()["Global"].items() if op in ATTENTION_OPS)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 5) -> float:
    """The best TFLOP/s of square ``dtype`` matmuls on ``device`` over ``reps`` timed repetitions: the limit a
    step's MFU is read against. The matmul is ``F.linear``, the op the models' linears run (on a CPU without
    native bf16, e.g. AVX2 only, torch's bf16 ``mm`` takes a reference loop ~15x slower than its bf16 ``linear``).
    8192² on CUDA (10 matmuls a repetition, enough to keep the clocks up); on the CPU, with this process's
    threads, the largest of 256² … 2048² that takes about 0.25 s at most (2048² where bf16 or fp32 is native)."""
    cuda = device.type == "cuda"
    inner = 10 if cuda else 1
    # A generator of its own: measuring between a run's steps must not change the random numbers they draw.
    generator = torch.Generator(device=device).manual_seed(0)
    size = size or (8192 if cuda else _cpu_matmul_size(dtype, generator))
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = float("inf")
    for rep in range(reps + 1):  # the first repetition warms up (allocations, kernel selection)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            F.linear(a, b)
        _synchronize(device)
        if rep:
            best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best / 1e12


def _cpu_matmul_size(
    dtype: torch.dtype, generator: torch.Generator, largest: int = 2048, budget_seconds: float = 0.25
) -> int:
    """The largest power-of-two size from 256 up to ``largest`` whose CPU matmul should fit ``budget_seconds``
    (each doubling costs 8x): a slow kernel is measured at a small size instead of for minutes."""
    size = 256
    while size < largest:
        a = torch.randn(size, size, generator=generator).to(dtype)
        F.linear(a, a)  # first call: allocation and kernel selection
        start = time.perf_counter()
        F.linear(a, a)
        if 8 * (time.perf_counter() - start) > budget_seconds:
            break
        size *= 2
    return size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
