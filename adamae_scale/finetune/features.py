"""A frozen encoder's features on disk: encode each view once, train many probe heads on them.

``finetune.lr_sweep`` reads a cache folder (``finetune.cache_dir``, default ``RUN_DIR/features``)::

    index.json                   what the features are of (``identity``) and, per split, its shard files
    train-00000.safetensors      features [n, ...], labels [n]: the training stream's clips, one view each
    val-00000.safetensors        features [n, V, ...], labels [n], index [n]: each held-out video's V views;
                                 its metadata holds the videos' keys and source paths (JSON)

A feature is what the probe reads (``VideoClassifier.probe_input``): the mean of the encoder's output tokens
``[D]`` for ``linear``, all tokens ``[N, D]`` for ``attentive``, stored in the run's precision (bf16 or fp32).
Every shard is written to a temporary name and renamed, then ``index.json`` is replaced the same way, so a run
stopped at any point resumes at the last whole shard: the training stream from the data state recorded with
it (exact, as a checkpoint resumes), the held-out videos by passing over the ones already stored. A cache
whose ``identity`` (encoder weights, architecture, probe mode, data, views, precision) differs is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..base.atomic import atomic_write_text
from . import evaluate

INDEX = "index.json"
CLIPS_PER_SHARD = 256
VIDEOS_PER_SHARD = 64


@dataclass
class Split:
    """The loaded features of one split (``keys``/``sources``/``index`` for the held-out videos only)."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    sources: list[str | None]
    index: list[int]


def file_identity(path: Path) -> dict[str, Any]:
    """A weights file by name, size and modification time (cheap; a rewritten file changes its mtime)."""
    stat = path.stat()
    return {"path": str(path.absolute()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class FeatureCache:
    """The cache folder ``root`` for features described by ``identity`` (a JSON-able dict)."""

    def __init__(self, root: Path, identity: dict[str, Any]):
        self.root = root
        self.identity = json.loads(json.dumps(identity))  # as it reads back from index.json
        self.fingerprint = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        index_path = root / INDEX
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            if self.index.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"finetune.cache_dir={root} holds features of another encoder, data or clip "
                    f"({index_path} fingerprint {self.index.get('fingerprint')}, this run {self.fingerprint}): "
                    "remove it or choose another folder"
                )
        else:
            self.index = {"fingerprint": self.fingerprint, "identity": self.identity, "splits": {}}

    def split_state(self, name: str) -> dict[str, Any]:
        return self.index["splits"].setdefault(name, {"shards": [], "complete": False, "stream_state": None})

    def stored(self, name: str) -> int:
        return sum(shard["count"] for shard in self.split_state(name)["shards"])

    def append(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], **state: Any) -> None:
        """One more shard of split ``name``, then the index (``state`` fields recorded with the split)."""
        self.root.mkdir(parents=True, exist_ok=True)
        split = self.split_state(name)
        file = f"{name}-{len(split['shards']):05d}.safetensors"
        tmp = self.root / f".{file}.tmp{os.getpid()}"
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={k: json.dumps(v) for k, v in metadata.items()},
        )
        os.replace(tmp, self.root / file)
        split["shards"].append({"file": file, "count": int(tensors["labels"].shape[0])})
        split.update(state)
        self._write_index()

    def finish(self, name: str, **state: Any) -> None:
        self.split_state(name).update(complete=True, **state)
        self._write_index()

    def _write_index(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / INDEX, json.dumps(self.index, indent=2))

    def load(self, name: str) -> Split:
        """Every shard of split ``name``, concatenated."""
        parts: dict[str, list[torch.Tensor]] = {"features": [], "labels": [], "index": []}
        keys: list[str] = []
        sources: list[str | None] = []
        for shard in self.split_state(name)["shards"]:
            with safe_open(str(self.root / shard["file"]), framework="pt") as reader:
                for key in reader.keys():
                    parts[key].append(reader.get_tensor(key))
                metadata = reader.metadata() or {}
            keys += json.loads(metadata.get("keys", "[]"))
            sources += json.loads(metadata.get("sources", "[]"))
        if not parts["labels"]:
            raise ValueError(f"feature cache {self.root}: split {name!r} holds no features")
        index = torch.cat(parts["index"]).tolist() if parts["index"] else []
        return Split(torch.cat(parts["features"]), torch.cat(parts["labels"]), keys, sources, index)

    def bytes_per_view(self, name: str) -> float:
        """Disk bytes of the split's shard files per stored view (headers included)."""
        split = self.split_state(name)
        size = sum((self.root / shard["file"]).stat().st_size for shard in split["shards"])
        views = split.get("views_per_item", 1) * max(self.stored(name), 1)
        return size / views


def fill_train(
    cache: FeatureCache,
    encode: Callable[[torch.Tensor], torch.Tensor],
    open_stream: Callable[[], Any],
    clips: int,
    dtype: torch.dtype,
    log: Callable[[str], None],
) -> None:
    """Encode the training stream's first ``clips`` clips into split ``train`` (resumed from the last shard)."""
    split = cache.split_state("train")
    if split["complete"]:
        return
    done = cache.stored("train")
    stream = open_stream()
    if split["stream_state"] is not None:
        stream.load_state_dict(split["stream_state"])
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    pending = 0
    try:
        while done + pending < clips:
            batch = next(stream)
            take = min(len(batch["label"]), clips - done - pending)
            features.append(encode(batch["video"][:take]).to(dtype).cpu())
            labels.append(batch["label"][:take].long())
            pending += take
            if pending >= CLIPS_PER_SHARD or done + pending >= clips:
                cache.append(
                    "train",
                    {"features": torch.cat(features), "labels": torch.cat(labels)},
                    {},
                    stream_state=stream.state_dict(),
                )
                done, pending, features, labels = done + pending, 0, [], []
                log(f"[adamae] feature cache: {done}/{clips} training clips")
    finally:
        stream.close()
    cache.finish("train", views_per_item=1)


def fill_val(
    cache: FeatureCache,
    encode: Callable[[torch.Tensor], torch.Tensor],
    videos: Callable[[Callable[[int], bool], list[str]], Iterator[evaluate.VideoViews]],
    views: int,
    chunk: int,
    dtype: torch.dtype,
    log: Callable[[str], None],
) -> None:
    """Encode every held-out video's ``views`` into split ``val`` (videos of stored shards passed over)."""
    split = cache.split_state("val")
    if split["complete"]:
        return
    done = {i for i in _stored_indices(cache)}
    skipped: list[str] = list(split.get("skipped", []))
    batch: list[evaluate.VideoViews] = []
    feats: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            cache.append(
                "val",
                {
                    "features": torch.stack(feats),
                    "labels": torch.tensor([item.label for item in batch], dtype=torch.long),
                    "index": torch.tensor([item.index for item in batch], dtype=torch.long),
                },
                {"keys": [item.key for item in batch], "sources": [item.source for item in batch]},
                skipped=skipped,
            )
            log(f"[adamae] feature cache: {cache.stored('val')} held-out videos")
            batch.clear()
            feats.clear()

    for item in videos(lambda index: index in done, skipped):
        feats.append(torch.cat([encode(part) for part in item.views.split(chunk)]).to(dtype).cpu())
        batch.append(evaluate.VideoViews(item.index, item.key, item.label, item.source, torch.empty(0)))
        if len(batch) >= VIDEOS_PER_SHARD:
            flush()
    flush()
    cache.finish("val", views_per_item=views, skipped=skipped)


def _stored_indices(cache: FeatureCache) -> Iterable[int]:
    for shard in cache.split_state("val")["shards"]:
        with safe_open(str(cache.root / shard["file"]), framework="pt") as reader:
            yield from reader.get_tensor("index").tolist()


__all__ = ["FeatureCache", "Split", "file_identity", "fill_train", "fill_val"]
