"""The pre-training configuration, checked once, before any process group, model or file exists.

``validate(cfg)`` is the one entry point that ``adamae-pretrain``, ``adamae-bench`` and the tests use. It
owns the range and type checks of the ``train``, ``loss``, ``eval``, ``precision``, ``ds``, ``run_dir`` and
``train.resume`` fields, and calls the model (``AdaMAEConfig``) and data (``validate_data``) checks, so a
mistake anywhere is one ``ValueError`` line naming the field, raised in well under a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from .data import validate_data
from .engine import engines, fairscale_engine, setup
from .models import AdaMAEConfig, make_config

LOSS_TARGETS = ("norm_pix", "pixel")
RESUME_WORDS = ("auto", "none")

# (key, minimum, integer?) for the train section; None = no bound below.
_TRAIN_NUMBERS: tuple[tuple[str, float, bool], ...] = (
    ("steps", 1, True),
    ("micro_batch_size", 1, True),
    ("accumulation", 1, True),
    ("log_every", 1, True),
    ("ckpt_every", 0, True),
    ("keep_last", 0, True),
    ("max_skipped_in_a_row", 1, True),
    ("base_lr", 0.0, False),
    ("min_lr", 0.0, False),
    ("weight_decay", 0.0, False),
    ("eps", 0.0, False),
    ("clip_grad", 0.0, False),
)


def compose(overrides: Sequence[str], config_name: str = "config") -> dict[str, Any]:
    """The resolved config for ``overrides`` (Hydra's override grammar), composed from the packaged ``configs/``
    exactly as ``adamae-pretrain`` (``config``) or ``adamae-finetune`` (``finetune``) composes it; a bad override
    is a one-line ``ValueError``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("adamae_scale.configs", version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(_one_line(str(err))) from err


def _one_line(hydra_message: str) -> str:
    """Hydra's first line, plus the options it lists below it for an unknown group choice (``engine=foo``)."""
    lines = hydra_message.splitlines()
    options: list[str] = []
    for line in lines[1:]:
        if line.startswith("Available options"):
            options = []
        elif line.startswith("\t") and line.strip() and not line.strip().startswith(("_", "provider=")):
            options.append(line.strip())
        elif options:
            break
    return f"{lines[0]} (available: {', '.join(options)})" if options else lines[0]


def validate(cfg: Mapping[str, Any]) -> AdaMAEConfig:
    """Every check that can fail before a process group or a model exists; returns the model config."""
    model_cfg = model_config(cfg["model"], cfg["masking"])
    validate_data(cfg["data"], model_cfg)
    check_rand_augment("data.rand_augment", cfg["data"].get("rand_augment"))
    check_train(cfg["train"])
    check_repeated_aug("data.repeated_aug", cfg["data"].get("repeated_aug", 1), cfg["train"]["micro_batch_size"])
    if cfg["precision"] not in setup.PRECISIONS:
        raise ValueError(f"precision={cfg['precision']!r}: expected one of {setup.PRECISIONS}")
    if cfg["loss"]["target"] not in LOSS_TARGETS:
        raise ValueError(f"loss.target={cfg['loss']['target']!r}: expected one of {LOSS_TARGETS}")
    _number("masking.sampling_loss_weight", cfg["masking"].get("sampling_loss_weight", 0.0), 0.0)
    _number("eval.focus_batches", cfg.get("eval", {}).get("focus_batches", 0), 0, integer=True)
    _number("eval.pictures", cfg.get("eval", {}).get("pictures", 0), 0, integer=True)
    _number("seed", cfg["seed"], None, integer=True)
    check_ds(cfg["ds"])
    check_engine(cfg)
    check_run_dir(cfg["run_dir"])
    check_resume(cfg["train"]["resume"])
    return model_cfg


def check_engine(cfg: Mapping[str, Any]) -> None:
    """``engine`` (``deepspeed`` or ``fairscale``) and what it cannot be combined with: fairscale's FSDP on the
    CPU, DeepSpeed's ZeRO-3 or offload settings under fairscale, activation offload under DeepSpeed."""
    name = engines.engine_name(cfg)
    if name not in engines.ENGINES:
        raise ValueError(f"engine={name!r}: expected one of {engines.ENGINES}")
    model = cfg["model"]
    offload = model.get("checkpoint_offload", False)
    if not isinstance(offload, bool):
        raise ValueError(f"model.checkpoint_offload={offload!r}: expected true or false")
    if offload and name != "fairscale":
        raise ValueError(
            "model.checkpoint_offload=true needs engine=fairscale (its checkpoint_wrapper offloads block inputs)"
        )
    if offload and not model.get("checkpoint_every", 0):
        raise ValueError(
            "model.checkpoint_offload=true offloads checkpointed blocks' inputs: set model.checkpoint_every"
        )
    if name != "fairscale":
        return
    sharding = cfg["engine"].get("sharding")
    if sharding not in fairscale_engine.SHARDINGS:
        raise ValueError(f"engine.sharding={sharding!r}: expected one of {fairscale_engine.SHARDINGS}")
    if sharding == "fsdp" and fairscale_engine.device_type() != "cuda":
        raise ValueError(
            "engine.sharding=fsdp: fairscale's FullyShardedDataParallel does not run on the CPU; use "
            "engine.sharding=oss_sdp (≈ ZeRO-2) or oss (≈ ZeRO-1) here"
        )
    zero = setup.load_ds_config(cfg["ds"]).get("zero_optimization", {})
    offloaded = any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))
    if zero.get("stage", 0) == 3 or offloaded:
        raise ValueError(
            f"ds={cfg['ds']}: DeepSpeed's ZeRO-3 and offload do not apply to engine=fairscale; choose its stage with "
            "engine.sharding=oss|oss_sdp|fsdp (fsdp ≈ ZeRO-3, CUDA only)"
        )


FINETUNE_MODES = ("full", "linear", "attentive")


def check_finetune(cfg: Mapping[str, Any]) -> None:
    """The fine-tuning run's own fields (the model is checked once the source is read)."""
    check_train(cfg["train"])
    if cfg["precision"] not in setup.PRECISIONS:
        raise ValueError(f"precision={cfg['precision']!r}: expected one of {setup.PRECISIONS}")
    tune = cfg["finetune"]
    if tune["mode"] not in FINETUNE_MODES:
        raise ValueError(f"finetune.mode={tune['mode']!r}: expected one of {FINETUNE_MODES}")
    check_rand_augment("finetune.rand_augment", tune["rand_augment"])
    for key in ("drop_path", "head_dropout", "label_smoothing", "mixup_switch_prob", "random_erasing"):
        if _number(f"finetune.{key}", tune[key], 0.0) >= 1.0:
            raise ValueError(f"finetune.{key}={tune[key]}: expected a number in [0, 1)")
    for key in ("layer_decay", "head_init_scale", "mixup", "cutmix"):
        _number(f"finetune.{key}", tune[key], 0.0)
    _number("finetune.checkpoint_every", tune["checkpoint_every"], 0, integer=True)
    mixing = tune["mode"] == "full" and (tune["mixup"] > 0 or tune["cutmix"] > 0)
    if mixing and cfg["train"]["micro_batch_size"] % 2:
        raise ValueError(
            f"train.micro_batch_size={cfg['train']['micro_batch_size']}: mixup/cutmix pair each clip with another "
            "of the micro-batch, so it must be even (or set finetune.mixup=0 finetune.cutmix=0)"
        )
    views = cfg["eval"]
    for key in ("temporal_views", "spatial_views", "videos", "micro_batch_size", "batches"):
        _number(f"eval.{key}", views[key], 1, integer=True)
    _number("eval.every", views["every"], 0, integer=True)
    if cfg.get("num_classes") is not None:
        _number("num_classes", cfg["num_classes"], 2, integer=True)
    _number("seed", cfg["seed"], None, integer=True)
    check_ds(cfg["ds"])
    check_run_dir(cfg["run_dir"])
    check_resume(cfg["train"]["resume"])


def check_rand_augment(name: str, policy: Any) -> None:
    """A timm RandAugment policy string (``rand-m7-n4-mstd0.5-inc1``) or null."""
    if policy is None:
        return
    import torch

    from .data.transforms import rand_augment_clip

    try:
        rand_augment_clip(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), str(policy), 0)
    except Exception as err:  # timm asserts or raises KeyError/ValueError on a malformed policy
        raise ValueError(
            f"{name}={policy!r}: not a timm RandAugment policy like rand-m7-n4-mstd0.5-inc1 ({err})"
        ) from err


def model_config(model: Mapping[str, Any], masking: Mapping[str, Any] | None = None) -> AdaMAEConfig:
    """A model section (+ the masking section; without it, ``model`` carries ``masking``/``mask_ratio`` as in a
    checkpoint's ``config.json``) → a checked ``AdaMAEConfig`` (geometry, widths, visible count). The pre-training
    config and ``adamae-convert``'s model overrides both go through here."""
    for key in _MODEL_SIZES:
        if key in model:
            _number(f"model.{key}", model[key], 1, integer=True)
    if "checkpoint_every" in model:
        _number("model.checkpoint_every", model["checkpoint_every"], 0, integer=True)
    img_size = model.get("img_size", 224)
    sizes = [img_size] if isinstance(img_size, int) else list(img_size or [])
    if len(sizes) not in (1, 2) or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"model.img_size={img_size!r}: expected a positive int or [height, width]")
    ratio = masking["ratio"] if masking is not None else model.get("mask_ratio", 0.95)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio < 1.0:
        raise ValueError(f"masking.ratio={ratio!r}: expected a number strictly between 0 and 1")
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


def check_train(train: Mapping[str, Any]) -> None:
    for key, minimum, integer in _TRAIN_NUMBERS:
        if key in train:
            _number(f"train.{key}", train[key], minimum, integer=integer)
    warmup = _number("train.warmup_fraction", train["warmup_fraction"], 0.0)
    if warmup > 1.0:
        raise ValueError(f"train.warmup_fraction={warmup}: expected a share of the steps in [0, 1]")
    betas = train["betas"]
    if (
        not isinstance(betas, (list, tuple))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"train.betas={betas!r}: expected two numbers in [0, 1)")
    if train.get("stop_after") is not None:
        _number("train.stop_after", train["stop_after"], 1, integer=True)
    if train.get("image_every") is not None:
        _number("train.image_every", train["image_every"], 0, integer=True)
    if not isinstance(train.get("compile", False), bool):
        raise ValueError(f"train.compile={train['compile']!r}: expected true or false")
    spike = train.get("loss_spike_factor")
    if spike is not None and _number("train.loss_spike_factor", spike, 0.0) <= 1.0:
        raise ValueError(f"train.loss_spike_factor={spike}: expected a factor > 1 (or null to turn the rule off)")
    prefixes = train.get("constant_lr_params", [])
    if not isinstance(prefixes, (list, tuple)) or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(f"train.constant_lr_params={prefixes!r}: expected a list of parameter-name prefixes")


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


def check_repeated_aug(field: str, repeats: Any, micro_batch_size: int | None) -> None:
    """Repeated augmentation (``field``: ``data.repeated_aug`` or ``finetune.repeated_aug``): an integer >= 1, and
    ``train.micro_batch_size``, which counts views, a whole number of clips (``None``: no batch to check)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"{field}={repeats!r}: expected an integer >= 1 (1 = off)")
    if micro_batch_size is not None and micro_batch_size % repeats:
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size}: it counts views, {field}={repeats} of each clip, so it "
            f"must be a multiple of it (or set {field}=1)"
        )


def _number(name: str, value: Any, minimum: float | None, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name}={value!r}: expected {kind}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}={value!r}: expected {kind}{bound}")
    return float(value)
