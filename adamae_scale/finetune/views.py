"""The held-out videos a fine-tuning run evaluates, as multi-view clips: each video on exactly one rank."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import cast

import torch

from ..base.pixels import normalize_
from ..config import FinetuneConfig
from ..data import ShardData, SyntheticData, synthetic_config
from ..data.synthetic import clip_label, render_clip
from ..engine import setup
from ..models import AdaMAEConfig
from . import evaluate


def held_out_videos(cfg: FinetuneConfig, model_cfg: AdaMAEConfig) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``(key, label, video [C, T', H, W'])`` of the held-out synthetic videos, rendered longer and wider than the
    clip when there are several temporal / spatial views (the views then cover different content)."""
    views = cfg.eval
    frames = model_cfg.num_frames * (2 if views.temporal_views > 1 else 1)
    height, width = model_cfg.img_size
    if views.spatial_views > 1:
        width = width + width // 3 // model_cfg.patch_size * model_cfg.patch_size
    eval_model = AdaMAEConfig(**{**model_cfg.to_dict(), "num_frames": frames, "img_size": (height, width)})
    data = cast(SyntheticData, cfg.data)
    synthetic = synthetic_config(dataclasses.replace(data, seed=data.eval_seed), eval_model)
    for index in range(views.videos):
        video, _ = render_clip(synthetic, index)
        yield f"synthetic-{index:06d}", clip_label(synthetic, index), normalize_(video)


def rank_views(
    cfg: FinetuneConfig,
    model_cfg: AdaMAEConfig,
    env: setup.DistEnv,
    skipped: list[str],
    done: Callable[[int], bool] | None = None,
) -> Iterator[evaluate.VideoViews]:
    """The videos this rank evaluates (each video on exactly one rank), as views; ``done(index)``: a video to
    pass over (a resumed feature cache)."""
    views = cfg.eval
    geometry = (model_cfg.num_frames, model_cfg.img_size)
    data = cfg.data
    if isinstance(data, ShardData):
        from .shard_views import rank_videos

        yield from rank_videos(
            data.val_urls,
            env.rank,
            env.world_size,
            *geometry,
            data.sampling_rate,
            views.temporal_views,
            views.spatial_views,
            skipped,
            done,
        )
        return
    videos = list(held_out_videos(cfg, model_cfg))
    for index in evaluate.shard_indices(len(videos), env.rank, env.world_size):
        if done is not None and done(index):
            continue
        key, label, video = videos[index]
        clips = evaluate.clip_views(video, *geometry, views.temporal_views, views.spatial_views)
        yield evaluate.VideoViews(index, key, label, None, clips)


def single_view_batches(
    cfg: FinetuneConfig, model_cfg: AdaMAEConfig, env: setup.DistEnv
) -> list[dict[str, torch.Tensor]]:
    """The periodic check's batches on shards: the centre clip (one temporal window, the middle crop) of this
    rank's first ``eval.batches × eval.micro_batch_size`` videos of ``data.val_urls``, labelled ones only."""
    one_view = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, temporal_views=1, spatial_views=1))
    size = cfg.eval.micro_batch_size
    videos: list[evaluate.VideoViews] = []
    for item in rank_views(one_view, model_cfg, env, skipped=[]):
        if item.label >= 0:
            videos.append(item)
        if len(videos) == cfg.eval.batches * size:
            break
    return [
        {
            "video": torch.cat([item.views for item in videos[start : start + size]]),
            "label": torch.tensor([item.label for item in videos[start : start + size]]),
        }
        for start in range(0, len(videos), size)
    ]
