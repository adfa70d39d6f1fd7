"""The one way a seed is derived from another: ``derive_seed(seed, *terms)``.

Every stream of random numbers that must replay exactly (a clip, a mask, a micro-batch's dropout, a shard
order) gets its own seed from the run's seed and the integers that identify it, so that it does not depend on
what else drew random numbers before it.
"""

from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime: seeds s and s + 1 give unrelated streams for any terms below it
TORCH_SEED_RANGE = 2**63  # torch.manual_seed takes a signed 64-bit value


def derive_seed(seed: int, *terms: int) -> int:
    """``seed × 1_000_003 + sum(terms)``: each ``term`` is an identifying integer already scaled by its own
    stride (e.g. ``step * 1_009``), or a constant that separates two streams of the same index."""
    return seed * SEED_STRIDE + sum(terms)


__all__ = ["SEED_STRIDE", "TORCH_SEED_RANGE", "derive_seed"]
