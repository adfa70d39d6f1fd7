"""The value checks of a run config: each raises one ``ValueError`` line naming the field and what was expected.

Every check of a value a user types lives here and runs once, while ``adamae_scale.config`` builds the typed
config, before any process group, model or file exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data import SOURCES, DataSection, ShardData
from ..engine import engines, fairscale_engine, setup
from ..models import AdaMAEConfig, make_config

LOSS_TARGETS = ("norm_pix", "pixel")
RESUME_WORDS = ("auto", "none")
FINETUNE_MODES = ("full", "linear", "attentive")

_MODEL_SIZES = (
    "num_frames",
    "patch_size",
    "tubelet_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "sampler_num_heads",
)


def number(name: str, value: Any, minimum: float | None, integer: bool = False) -> float:
    """``value`` as a finite number (an integer when ``integer``) not below ``minimum``."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name}={value!r}: expected {kind}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}={value!r}: expected {kind}{bound}")
    return float(value)


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected true or false")


def share(name: str, value: Any) -> None:
    """A probability-like number in [0, 1)."""
    if number(name, value, 0.0) >= 1.0:
        raise ValueError(f"{name}={value}: expected a number in [0, 1)")


def model_config(model: Mapping[str, Any], masking: Mapping[str, Any] | None = None) -> AdaMAEConfig:
    """A model section (+ the masking section; without it, ``model`` carries ``masking``/``mask_ratio`` as in a
    checkpoint's ``config.json``) → a checked ``AdaMAEConfig`` (geometry, widths, visible count). The run configs
    and ``adamae-convert``'s model overrides both go through here."""
    for key in _MODEL_SIZES:
        if key in model:
            number(f"model.{key}", model[key], 1, integer=True)
    if "checkpoint_every" in model:
        number("model.checkpoint_every", model["checkpoint_every"], 0, integer=True)
    img_size = model.get("img_size", 224)
    sizes = [img_size] if isinstance(img_size, int) else list(img_size or [])
    if len(sizes) not in (1, 2) or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"model.img_size={img_size!r}: expected a positive int or [height, width]")
    ratio = masking["ratio"] if masking is not None else model.get("mask_ratio", AdaMAEConfig.mask_ratio)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio < 1.0:
        raise ValueError(f"masking.ratio={ratio!r}: expected a number strictly between 0 and 1")
    if "sampler_pool" in model:
        number("model.sampler_pool", model["sampler_pool"], 1, integer=True)
    if "sampler_kv_pool" in model:
        number("model.sampler_kv_pool", model["sampler_kv_pool"], 1, integer=True)
    if "sampler_width_ratio" in model:
        number("model.sampler_width_ratio", model["sampler_width_ratio"], 0.0)
    decoder = masking if masking is not None else model
    if "decoder_ratio" in decoder:
        number("masking.decoder_ratio", decoder["decoder_ratio"], 0.0)
    cfg = make_config(model, masking)
    visible = cfg.num_visible  # raises when the ratio leaves no visible token
    if visible >= cfg.num_tokens:
        raise ValueError(
            f"masking.ratio={ratio} masks none of the {cfg.num_tokens} tokens of this clip: expected a higher ratio"
        )
    for dim, heads, name in (
        (cfg.embed_dim, cfg.num_heads, "model.num_heads"),
        (cfg.decoder_embed_dim, cfg.decoder_num_heads, "model.decoder_num_heads"),
        (cfg.embed_dim, cfg.sampler_num_heads, "model.sampler_num_heads"),
    ):
        if dim % heads:
            raise ValueError(f"{name}={heads} does not divide the width {dim}")
    return cfg


def check_data(data: DataSection, model_cfg: AdaMAEConfig) -> None:
    """The data section against the clip geometry: shard locations exist (the data layer's own checks run too)."""
    one_of("data", data.name, SOURCES)
    if not isinstance(data, ShardData):
        from ..data import synthetic_config

        synthetic_config(data, model_cfg)  # its own checks (background, label task)
        return
    if isinstance(data, ShardData):
        from ..data import shard_config
        from ..data.pipeline import shard_urls

        shard_urls(shard_config(data, model_cfg).urls)
        if data.val_urls:
            shard_urls(data.val_urls)
    check_rand_augment("data.rand_augment", getattr(data, "rand_augment", None))


def check_rand_augment(name: str, policy: Any) -> None:
    """A timm RandAugment policy string (``rand-m7-n4-mstd0.5-inc1``) or null."""
    if policy is None:
        return
    import torch

    from ..data.transforms import rand_augment_clip

    try:
        rand_augment_clip(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), str(policy), 0)
    except Exception as err:  # timm asserts or raises KeyError/ValueError on a malformed policy
        raise ValueError(
            f"{name}={policy!r}: not a timm RandAugment policy like rand-m7-n4-mstd0.5-inc1 ({err})"
        ) from err


def check_ds(name_or_path: str) -> dict[str, Any]:
    """``ds``: a shipped name or a JSON file holding an object whose ``zero_optimization.stage`` is 0-3."""
    config = setup.load_ds_config(name_or_path)
    if not isinstance(config, dict):
        raise ValueError(f"ds={name_or_path}: expected a JSON object, got a JSON {type(config).__name__}")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"ds={name_or_path}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"ds={name_or_path}: zero_optimization.stage={stage!r}, expected 0, 1, 2 or 3")
    setup.build_ds_config(config, 1, 1, 1, "fp32", 0.0)
    return config


def ds_stage(name_or_path: str) -> int:
    """The ZeRO stage of ``ds`` (``auto`` reads as ``zero0``)."""
    return int(setup.load_ds_config(name_or_path).get("zero_optimization", {}).get("stage", 0))


def check_engine(name: str, sharding: Any, ds: str, checkpoint_every: int, checkpoint_offload: Any) -> None:
    """``engine`` (``deepspeed`` or ``fairscale``) and what it cannot be combined with: fairscale's FSDP on the
    CPU, DeepSpeed's ZeRO-3 or offload settings under fairscale, activation offload under DeepSpeed."""
    one_of("engine", name, engines.ENGINES)
    boolean("model.checkpoint_offload", checkpoint_offload)
    if checkpoint_offload and name != "fairscale":
        raise ValueError(
            "model.checkpoint_offload=true needs engine=fairscale (its checkpoint_wrapper offloads block inputs)"
        )
    if checkpoint_offload and not checkpoint_every:
        raise ValueError(
            "model.checkpoint_offload=true offloads checkpointed blocks' inputs: set model.checkpoint_every"
        )
    if name != "fairscale":
        return
    one_of("engine.sharding", sharding, fairscale_engine.SHARDINGS)
    if sharding == "fsdp" and fairscale_engine.device_type() != "cuda":
        raise ValueError(
            "engine.sharding=fsdp: fairscale's FullyShardedDataParallel does not run on the CPU; use "
            "engine.sharding=oss_sdp (≈ ZeRO-2) or oss (≈ ZeRO-1) here"
        )
    zero = setup.load_ds_config(ds).get("zero_optimization", {})
    offloaded = any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))
    if zero.get("stage", 0) == 3 or offloaded:
        raise ValueError(
            f"ds={ds}: DeepSpeed's ZeRO-3 and offload do not apply to engine=fairscale; choose its stage with "
            "engine.sharding=oss|oss_sdp|fsdp (fsdp ≈ ZeRO-3, CUDA only)"
        )


def check_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` must be creatable and writable: no regular file on its path."""
    path = Path(run_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"run_dir={run_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"run_dir={run_dir}: {parent} is not writable")
            break
    return path


def check_resume(resume: Any) -> None:
    """``train.resume``: ``auto``, ``none`` or an existing checkpoint (tag) folder."""
    if resume in (None, "", False) or resume in RESUME_WORDS:
        return
    path = Path(str(resume))
    if not path.is_dir():
        raise ValueError(f"train.resume={resume}: no such folder (expected auto, none or a checkpoint folder)")
    if not engines.is_checkpoint_folder(path):
        raise ValueError(
            f"train.resume={resume}: not a checkpoint folder (no *model_states.pt or {fairscale_engine.META_FILE} "
            "inside; expected RUN_DIR/checkpoints/step_NNNNNNNN)"
        )
