"""Which network a set of weights belongs to: expected shapes, strict comparison, readable mismatches."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from omegaconf import OmegaConf

from ..config.checks import model_config
from ..models import AdaMAE, AdaMAEConfig, config_for, make_config, model_names
from ..models.classifier import VideoClassifier
from ..models.registry import config_dir
from .errors import ArchitectureMismatchError, ConvertError


def describe(cfg: AdaMAEConfig) -> str:
    h, w = cfg.img_size
    return (
        f"model {cfg.name} (encoder {cfg.embed_dim} wide x {cfg.depth} blocks, decoder {cfg.decoder_embed_dim} x "
        f"{cfg.decoder_depth}, {cfg.num_frames}x{h}x{w} clips in {cfg.tubelet_size}x{cfg.patch_size}x{cfg.patch_size} "
        f"tubelets = {cfg.num_tokens} tokens, masking {cfg.masking})"
    )


@lru_cache(maxsize=16)
def _expected_shapes(config_items: tuple) -> dict[str, tuple[int, ...]]:
    cfg = AdaMAEConfig(**dict(config_items))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AdaMAE(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def expected_shapes(cfg: AdaMAEConfig) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of ``AdaMAE(cfg).state_dict()``, in the model's order."""
    items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(cfg).items())
    return dict(_expected_shapes(items))


def _listing(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def describe_classifier(cfg: AdaMAEConfig, num_classes: int) -> str:
    h, w = cfg.img_size
    return (
        f"classifier {cfg.name} (encoder {cfg.embed_dim} wide x {cfg.depth} blocks over all {cfg.num_tokens} tokens "
        f"of {cfg.num_frames}x{h}x{w} clips, mean pooling, {num_classes} classes)"
    )


def classifier_shapes(cfg: AdaMAEConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of ``VideoClassifier(cfg, num_classes).state_dict()``, in the model's order."""
    with torch.device("meta"):
        model = VideoClassifier(cfg, num_classes)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(
    found: Mapping[str, Sequence[int]],
    cfg: AdaMAEConfig,
    source: str,
    num_classes: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Raise ``ArchitectureMismatchError`` unless ``found`` has exactly the model's names and shapes: the AdaMAE
    model's, or with ``num_classes`` the fine-tuning classifier's. Returns those shapes, in the model's order."""
    expected = expected_shapes(cfg) if num_classes is None else classifier_shapes(cfg, num_classes)
    target = describe(cfg) if num_classes is None else describe_classifier(cfg, num_classes)
    wrong = [name for name in expected if name in found and tuple(found[name]) != expected[name]]
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if not (wrong or missing or unexpected):
        return expected
    problems = []
    if wrong:
        first = wrong[0]
        problems.append(
            f"{first} is {list(found[first])} there but {list(expected[first])} in the model"
            + (f" ({len(wrong) - 1} more shapes differ)" if len(wrong) > 1 else "")
        )
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listing(unexpected)}")
    raise ArchitectureMismatchError(f"{source} does not match {target}: " + "; ".join(problems))


def named_config(name: str, **overrides: Any) -> AdaMAEConfig:
    """``configs/model/NAME.yaml`` plus overrides, with the error a user can act on."""
    if name not in model_names():
        raise ConvertError(f"--model {name!r}: expected one of {model_names()}")
    try:
        return model_config(config_for(name, **overrides).to_dict())
    except ValueError as err:
        raise ConvertError(str(err)) from err


def with_overrides(cfg: AdaMAEConfig, **overrides: Any) -> AdaMAEConfig:
    """``cfg`` with the non-``None`` overrides applied (and validated)."""
    values = cfg.to_dict()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model_config(values)
    except ValueError as err:
        raise ConvertError(str(err)) from err


# -- the architecture, from shapes (and a reference checkpoint's args, and the user's options) --------------------
_SIZE_WORDS = {
    "tiny": "vit_tiny",
    "small": "vit_small",
    "base": "vit_base",
    "large": "vit_large",
    "huge": "vit_huge",
    "giant": "vit_giant",
}


def _block_count(shapes: Mapping[str, torch.Size], prefix: str) -> int:
    indices = {int(m.group(1)) for n in shapes if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", n))}
    if indices != set(range(len(indices))):
        raise ConvertError(f"{prefix} blocks are numbered {sorted(indices)}: some are missing")
    return len(indices)


def _shape(shapes: Mapping[str, torch.Size], name: str) -> torch.Size:
    if name not in shapes:
        raise ConvertError(f"checkpoint lacks {name}, needed to tell the architecture")
    return shapes[name]


def _args_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


def _size_from_args(args: Mapping[str, Any]) -> str | None:
    model = str(args.get("model", "")).lower()
    for word, name in _SIZE_WORDS.items():
        if re.search(rf"(?:^|_){word}(?:_|$)", model) and name in model_names():
            return name
    return None


def _default_mask_ratio(strategy: str) -> float:
    return float(OmegaConf.create(config_dir().joinpath("masking", f"{strategy}.yaml").read_text())["ratio"])


def infer_config(
    shapes: Mapping[str, torch.Size],
    args: Any = None,
    model: str | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    num_frames: int | None = None,
    img_size: tuple[int, int] | None = None,
    tubelet_size: int | None = None,
    patch_size: int | None = None,
    masking: str | None = None,
    mask_ratio: float | None = None,
) -> AdaMAEConfig:
    """The ``AdaMAEConfig`` of renamed reference weights. Widths, depths, the MLP ratio, channels, tubelet
    and patch size come from shapes; heads from ``model``/``num_heads``, ``args.model`` or the size of the
    same width; the clip geometry from the options, then ``args``, then the base size's defaults."""
    args = _args_dict(args)
    embed_dim, in_chans, tubelet, patch_h, patch_w = _shape(shapes, "encoder.patch_embed.proj.weight")
    if patch_h != patch_w:
        raise ConvertError(f"the patch embedding has {patch_h}x{patch_w} patches; this model needs square patches")
    depth = _block_count(shapes, "encoder.blocks")
    decoder_depth = _block_count(shapes, "decoder.blocks")
    decoder_dim = _shape(shapes, "encoder_to_decoder.weight")[0]
    mlp_hidden = _shape(shapes, "encoder.blocks.0.mlp.fc1.weight")[0]
    mlp_ratio = mlp_hidden / embed_dim
    if decoder_depth:
        decoder_hidden = _shape(shapes, "decoder.blocks.0.mlp.fc1.weight")[0]
        if decoder_hidden * embed_dim != mlp_hidden * decoder_dim:
            raise ConvertError(
                f"decoder MLP ratio {decoder_hidden / decoder_dim:g} differs from the encoder's "
                f"{mlp_ratio:g}; this model uses one ratio for both"
            )
    for name, value, seen in (("--tubelet-size", tubelet_size, tubelet), ("--patch-size", patch_size, patch_h)):
        if value is not None and value != seen:
            raise ArchitectureMismatchError(f"{name} {value} does not match the checkpoint's patch embedding ({seen})")
    measured = {
        "embed_dim": embed_dim,
        "depth": depth,
        "decoder_embed_dim": decoder_dim,
        "decoder_depth": decoder_depth,
    }

    # The size that gives the head counts: --model (checked below), else the size named in args.model, else the
    # first size of the same width; a named size of another width is a wrong guess and is not used.
    candidates = [_size_from_args(args)] + [n for n in model_names() if config_for(n).embed_dim == embed_dim]
    size = model or next((n for n in candidates if n is not None and config_for(n).embed_dim == embed_dim), None)
    if model is not None:
        base = named_config(model)
        differ = [
            f"{k} {v} (--model {model} has {getattr(base, k)})" for k, v in measured.items() if getattr(base, k) != v
        ]
        if differ:
            raise ArchitectureMismatchError(
                f"checkpoint does not match --model {model}: checkpoint " + ", ".join(differ)
            )
    base = config_for(size) if size is not None else AdaMAEConfig()
    if num_heads is None and size is None:
        raise ConvertError(
            f"cannot tell the number of attention heads of a {embed_dim}-wide encoder from its shapes; "
            "pass --model NAME or --num-heads N"
        )
    if decoder_num_heads is None and base.decoder_embed_dim != decoder_dim:
        by_width = [
            config_for(n).decoder_num_heads for n in model_names() if config_for(n).decoder_embed_dim == decoder_dim
        ]
        if not by_width:
            raise ConvertError(
                f"cannot tell the number of attention heads of a {decoder_dim}-wide decoder from its "
                "shapes; pass --decoder-num-heads N"
            )
        decoder_num_heads = by_width[0]

    input_size = args.get("input_size")
    if img_size is None and input_size is not None:
        img_size = tuple(input_size) if isinstance(input_size, (list, tuple)) else (int(input_size), int(input_size))
    has_sampler = "sampler.pos_embed_probs" in shapes
    if masking is None:
        arg_mask = str(args.get("mask_type", ""))
        masking = "adaptive" if has_sampler else (arg_mask if arg_mask in ("random", "tube") else "tube")
    if mask_ratio is None:
        mask_ratio = float(args["mask_ratio"]) if "mask_ratio" in args else _default_mask_ratio(masking)
    values = {
        **base.to_dict(),
        **measured,
        "name": size or base.name,
        "in_chans": in_chans,
        "tubelet_size": tubelet,
        "patch_size": patch_h,
        "mlp_ratio": mlp_ratio,
        "num_heads": num_heads or base.num_heads,
        "decoder_num_heads": decoder_num_heads or base.decoder_num_heads,
        "num_frames": num_frames or int(args.get("num_frames") or base.num_frames),
        "img_size": list(img_size or base.img_size),
        "masking": masking,
        "mask_ratio": mask_ratio,
        "pos_embed": "sincos_1d",
        "drop_path": 0.0,
    }
    try:
        cfg = make_config(values)
    except ValueError as err:
        raise ConvertError(str(err)) from err
    head_checks = [
        (cfg.embed_dim, cfg.num_heads, "--num-heads"),
        (cfg.decoder_embed_dim, cfg.decoder_num_heads, "--decoder-num-heads"),
    ]
    if cfg.masking == "adaptive":
        head_checks.append((cfg.embed_dim, cfg.sampler_num_heads, "the sampler's head count"))
    for width, heads, what in head_checks:
        if width % heads:
            raise ArchitectureMismatchError(f"{what} {heads} does not divide the width {width}")
    try:
        cfg = model_config(values)  # the ranges every model config is held to
    except ValueError as err:
        raise ConvertError(str(err)) from err
    if has_sampler and shapes["sampler.pos_embed_probs"][1] != cfg.num_tokens:
        n = shapes["sampler.pos_embed_probs"][1]
        raise ArchitectureMismatchError(
            f"the sampler's pos_embed_probs covers {n} tokens, but {cfg.num_frames} frames of "
            f"{cfg.img_size[0]}x{cfg.img_size[1]} make {cfg.num_tokens}; pass the trained "
            "--num-frames/--img-size"
        )
    return cfg


__all__ = [
    "check_shapes",
    "classifier_shapes",
    "describe",
    "describe_classifier",
    "expected_shapes",
    "infer_config",
    "named_config",
    "with_overrides",
]
