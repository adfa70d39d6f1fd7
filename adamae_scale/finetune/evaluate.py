"""Multi-view evaluation of a video classifier: views of a clip, softmax averaged per video, top-1/top-5/mean
per-class accuracy, and the distributed bookkeeping that counts every video exactly once.

The reference protocol (VideoMAE/AdaMAE ``test`` mode): ``temporal_views`` windows evenly spaced over the video ×
``spatial_views`` crops evenly spaced along the long side of the frame (the short side already at the model's
size), the softmax of every view averaged per video (K400 5×3, SSv2 2×3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..base.collectives import gather_objects


def view_starts(length: int, window: int, views: int) -> list[int]:
    """``views`` start offsets of a ``window`` along ``length``, evenly spaced from the start to the end
    (one view: centred)."""
    if window > length:
        raise ValueError(f"a view of {window} does not fit in {length}")
    if views == 1:
        return [(length - window) // 2]
    return [round(i * (length - window) / (views - 1)) for i in range(views)]


def clip_views(
    video: torch.Tensor, num_frames: int, size: tuple[int, int], temporal_views: int, spatial_views: int
) -> torch.Tensor:
    """``video [C, T, H, W]`` → ``[temporal_views × spatial_views, C, num_frames, h, w]``, time-major: view
    ``t * spatial_views + s`` is temporal window t, crop s. Crops move along the longer image axis."""
    _, length, height, width = video.shape
    h, w = size
    times = view_starts(length, num_frames, temporal_views)
    along_width = width - w >= height - h
    crops = view_starts(width if along_width else height, w if along_width else h, spatial_views)
    top, left = (height - h) // 2, (width - w) // 2
    views = []
    for t in times:
        for c in crops:
            y, x = (top, c) if along_width else (c, left)
            views.append(video[:, t : t + num_frames, y : y + h, x : x + w])
    return torch.stack(views)


def average_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """``[videos × views, K]`` logits (views of a video adjacent) → ``[videos, K]`` mean softmax."""
    probs = logits.float().softmax(-1)
    return probs.view(-1, views, probs.shape[-1]).mean(1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top-1, top-5 (top-k with k = min(5, K)) and mean per-class top-1 (classes present only)."""
    top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(-1)
    per_class = [hit1[labels == c].float().mean() for c in range(num_classes) if bool((labels == c).any())]
    return {
        "top1": float(hit1.float().mean()),
        "top5": float(hit5.float().mean()),
        "mean_class_accuracy": float(torch.stack(per_class).mean()) if per_class else 0.0,
        "videos": int(labels.numel()),
    }


@dataclass
class VideoViews:
    """One evaluation video, decoded: its views ``[V, C, T, H, W]`` (time-major, see ``clip_views``)."""

    index: int  # position of the video in the evaluation set (unique over all ranks)
    key: str
    label: int
    source: str | None
    views: torch.Tensor


@dataclass
class Prediction:
    index: int  # position of the video in the evaluation set
    key: str
    label: int
    probs: torch.Tensor  # [K] mean softmax over the views
    source: str | None = None  # the video's source path (shards: as adamae-shards recorded it)


def shard_indices(count: int, rank: int, world_size: int) -> range:
    """The videos rank ``rank`` evaluates: every ``world_size``-th from ``rank`` (uneven counts included)."""
    return range(rank, count, world_size)


def gather_predictions(local: Sequence[Prediction]) -> list[Prediction]:
    """Every rank's predictions on every rank, ordered by index, each index once (a video two ranks both
    evaluated, e.g. padding, is kept once)."""
    parts = gather_objects([(p.index, p.key, p.label, p.probs.cpu(), p.source) for p in local])
    gathered = [[Prediction(*item) for item in part] for part in parts]
    unique: dict[int, Prediction] = {}
    for part in gathered:
        for prediction in part:
            unique.setdefault(prediction.index, prediction)
    return [unique[i] for i in sorted(unique)]


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, K]`` counts: row = true class, column = predicted class (labels outside ``[0, K)`` left out)."""
    known = (labels >= 0) & (labels < num_classes)
    flat = labels[known] * num_classes + predicted[known]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class(counts: torch.Tensor, names: Sequence[str]) -> list[dict[str, Any]]:
    """Each class's videos and top-1 (``None`` for a class with no videos), from the confusion matrix."""
    rows = []
    for index, name in enumerate(names):
        videos = int(counts[index].sum())
        top1 = float(counts[index, index]) / videos if videos else None
        rows.append({"index": index, "name": name, "videos": videos, "top1": top1})
    return rows


def summarize(
    predictions: Iterable[Prediction], num_classes: int, names: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics: top-1/top-5/mean class accuracy, per-class top-1 and the confusion matrix; ``predictions.jsonl``
    rows: key, source, label and its name, the top-5 classes, their names and probabilities)."""
    items = list(predictions)
    if not items:
        raise ValueError("evaluation saw no videos")
    names = list(names) if names is not None else [f"class_{i}" for i in range(num_classes)]
    probs = torch.stack([p.probs for p in items])
    labels = torch.tensor([p.label for p in items])
    rows = []
    for p in items:
        values, classes = p.probs.topk(min(5, num_classes))
        rows.append(
            {
                "key": p.key,
                "source": p.source,
                "label": p.label,
                "label_name": names[p.label] if 0 <= p.label < num_classes else None,
                "predicted": int(classes[0]),
                "predicted_name": names[int(classes[0])],
                "top5": classes.tolist(),
                "top5_names": [names[int(c)] for c in classes],
                "top5_probs": [round(float(v), 6) for v in values],
            }
        )
    counts = confusion_matrix(probs.argmax(-1), labels, num_classes)
    metrics: dict[str, Any] = dict(accuracy(probs, labels, num_classes))
    metrics["per_class"] = per_class(counts, names)
    metrics["confusion_matrix"] = {"class_names": names, "rows": "true class", "counts": counts.tolist()}
    return metrics, rows


__all__ = [
    "Prediction",
    "VideoViews",
    "accuracy",
    "average_views",
    "clip_views",
    "confusion_matrix",
    "gather_predictions",
    "per_class",
    "shard_indices",
    "summarize",
    "view_starts",
]
