"""Does the sampler look at what moves? Focus figures of one clip, from its pixels or from ground truth.

Real footage has no motion labels, so motion is measured from the clip itself: the absolute difference of
each frame from the previous one (the first frame takes the second's), averaged over each token's pixels,
channels and frames. The top 10% of tokens by that measure are the clip's "moving" tokens. For them:

- ``prob_share``: the share of the sampler's probability mass on them;
- ``visible_share``: the share of the visible tokens that are among them;
- ``random_share``: what random masking (and a uniform sampler) gives for both, in expectation: k / N.

Synthetic clips add the same figures for their ground-truth motion tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_FRACTION = 0.10


def token_motion(frames: np.ndarray, tubelet: int, patch: int) -> np.ndarray:
    """Mean absolute frame difference per token: ``[T, H, W, 3]`` uint8 → ``[N]`` (tokens in t, h, w order)."""
    t, h, w, _ = frames.shape
    grey = frames.astype(np.float32).mean(axis=-1)  # (T, H, W)
    if t < 2:
        return np.zeros((t // tubelet) * (h // patch) * (w // patch), dtype=np.float32)
    diff = np.abs(np.diff(grey, axis=0))  # (T-1, H, W): frame i+1 against frame i
    per_frame = np.concatenate([diff[:1], diff])  # (T, H, W)
    cubes = per_frame.reshape(t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    return cubes.mean(axis=(1, 3, 5)).reshape(-1)


def top_tokens(values: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Boolean ``[N]``: the ``max(1, round(fraction * N))`` tokens with the highest values (ties: lower index)."""
    k = max(1, round(fraction * values.size))
    chosen = np.zeros(values.size, dtype=bool)
    chosen[np.argsort(-values, kind="stable")[:k]] = True
    return chosen


def shares(selected: np.ndarray, mask: np.ndarray, probs: np.ndarray | None) -> dict[str, Any]:
    """Focus figures of the ``selected`` tokens (bool ``[N]``) for a mask (True = masked) and the sampler's p."""
    visible = ~mask
    figures: dict[str, Any] = {
        "tokens": int(selected.sum()),
        "visible_share": float((visible & selected).sum() / max(int(visible.sum()), 1)),
        "random_share": float(selected.mean()),
    }
    if probs is not None:
        figures["prob_share"] = float(probs[selected].sum())
    return figures


def clip_focus(
    frames: np.ndarray,
    mask: np.ndarray,
    probs: np.ndarray | None,
    tubelet: int,
    patch: int,
    ground_truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """``{"top_moving": figures or None (a still clip), "ground_truth": figures}`` (the latter when given)."""
    motion = token_motion(frames, tubelet, patch)
    report: dict[str, Any] = {
        "top_fraction": TOP_FRACTION,
        "top_moving": shares(top_tokens(motion), mask, probs) if motion.max() > 0 else None,
    }
    if ground_truth is not None:
        report["ground_truth"] = shares(ground_truth.astype(bool), mask, probs)
    return report


def describe(name: str, report: dict[str, Any]) -> str:
    """The one line printed per clip."""
    parts = []
    for key, what in (("top_moving", "top-10% moving tokens"), ("ground_truth", "ground-truth motion tokens")):
        if key not in report:
            continue
        figures = report[key]
        if figures is None:
            parts.append("no motion between frames: no focus figures")
            continue
        held = f"{figures['visible_share']:.1%} of the visible tokens"
        if "prob_share" in figures:
            held = f"{figures['prob_share']:.1%} of the sampler's probability and {held}"
        parts.append(f"{what} ({figures['tokens']}) hold {held} (random masking: {figures['random_share']:.1%})")
    return f"{name}: " + "; ".join(parts)


__all__ = ["TOP_FRACTION", "clip_focus", "describe", "shares", "token_motion", "top_tokens"]
