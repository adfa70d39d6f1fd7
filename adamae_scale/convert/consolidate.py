"""``consolidate``: a DeepSpeed ZeRO 0-3 or an engine=fairscale checkpoint (any world size) → one
``model.safetensors``: the AdaMAE model of a pre-training checkpoint, the classifier (or its model EMA) of a
fine-tuning one.

The output holds the optimizer's fp32 master weights, bit for bit:

- ZeRO-1/2/3: DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (lazy mode)
  reassembles the partitions; this module never re-derives ZeRO's layout. Two things are swapped
  inside that DeepSpeed module while it parses (``_deepspeed_parsing``):
  ``torch.load`` becomes ``safe_torch_load`` (``weights_only=True``, an allowlist of the three
  DeepSpeed classes its files contain, memory-mapped), because DeepSpeed itself un-pickles with
  ``weights_only=False``; and ``torch.cat`` becomes a lazy concatenation, because the ZeRO-1/2 merge
  otherwise concatenates every rank's partition into a second full copy of the model.
- ZeRO-0: there is no partitioned copy; the ``module`` state in ``mp_rank_00_model_states.pt`` is
  what the optimizer updates (fp32: this project trains bf16 under autocast with fp32 parameters).
- engine=fairscale: its ``model.safetensors`` already holds the full fp32 weights (OSS updates the module's
  own parameters; FSDP's are gathered before saving), read lazily from the checkpoint.

Memory: the checkpoint files are memory-mapped and tensors are written to the output one at a time,
so the process touches each master weight once (about one fp32 copy of the model in resident
pages) and never holds the Adam moments or a second copy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.atomic import atomic_output_dir
from ..base.weights import DEEPSPEED_GLOBALS, SafetensorsReader, TensorLike, lazy_map, safe_torch_load
from ..engine import engines, fairscale_engine
from ..engine.checkpoint import MANIFEST
from ..engine.checkpoint import verify as verify_checkpoint
from ..models import AdaMAEConfig
from ..models.pooler import AttentiveSpec
from .arch import check_shapes, describe, describe_classifier, infer_config, with_overrides
from .errors import ConvertError
from .folder import FORMAT_CLASSIFIER, FORMAT_FULL, FORMAT_VERSION, folder_model_config, write_folder

RUN_CONFIG_FILE = "config.json"  # written by adamae-pretrain next to every checkpoint tag


@dataclass(frozen=True)
class CheckpointLocation:
    root: Path  # the folder holding tag folders and ``latest``
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag


def locate_checkpoint(ckpt_dir: str | Path, tag: str | None = None) -> CheckpointLocation:
    """Accepts a tag folder (``.../checkpoints/step_00000030``), a checkpoints folder with a ``latest``
    file, or a run folder (``RUN_DIR`` holding ``checkpoints/``); ``tag`` picks a tag explicitly."""
    path = Path(ckpt_dir).absolute()
    if not path.exists():
        raise ConvertError(f"CKPT_DIR {path}: no such folder")
    if not path.is_dir():
        raise ConvertError(f"CKPT_DIR {path} is a file; expected a DeepSpeed checkpoint folder")
    if tag is None and engines.is_checkpoint_folder(path):
        return CheckpointLocation(path.parent, path.name)
    for root in (path, path / "checkpoints"):
        if tag is not None and engines.is_checkpoint_folder(root / tag):
            return CheckpointLocation(root, tag)
        latest = root / "latest"
        if tag is None and latest.is_file():
            found = latest.read_text().strip()
            if not engines.is_checkpoint_folder(root / found):
                raise ConvertError(f"{latest} names tag {found!r}, but {root / found} holds no *_model_states.pt")
            return CheckpointLocation(root, found)
    if tag is not None:
        tags = sorted(
            p.name
            for root in (path, path / "checkpoints")
            if root.is_dir()
            for p in root.iterdir()
            if engines.is_checkpoint_folder(p)
        )
        raise ConvertError(f"CKPT_DIR {path} has no checkpoint tag {tag!r} (found: {tags or 'none'})")
    raise ConvertError(f"CKPT_DIR {path} is not a DeepSpeed checkpoint: no *_model_states.pt and no 'latest' file")


# -- DeepSpeed's reassembly, run safely and lazily ----------------------------------------------------
class _LazyFlatSlice:
    """``flat[start:start+length].view(shape)`` of a ``_LazyConcat``; data gathered on ``contiguous()``."""

    def __init__(self, source: _LazyConcat, start: int, length: int, shape: torch.Size):
        self.source, self.start, self.length, self.shape = source, start, length, shape
        self.dtype = source.dtype

    def numel(self) -> int:
        return self.length

    def view(self, *shape: Any) -> _LazyFlatSlice:
        size = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if math.prod(size) != self.length:
            raise RuntimeError(f"cannot view {self.length} elements as {list(size)}")
        return _LazyFlatSlice(self.source, self.start, self.length, size)

    def contiguous(self) -> torch.Tensor:
        pieces = []
        for part, part_start in zip(self.source.parts, self.source.starts, strict=True):
            lo = max(self.start, part_start)
            hi = min(self.start + self.length, part_start + part.numel())
            if lo < hi:
                pieces.append(part[lo - part_start : hi - part_start])
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one piece: a view, no copy
        return flat.view(self.shape)


class _LazyConcat:
    """Stands in for ``torch.cat(parts, 0)`` of 1-D tensors: ``numel``, ``narrow(0, ...)``, nothing copied."""

    def __init__(self, parts: Sequence[Any], dim: int = 0):
        if dim != 0 or any(getattr(p, "dim", lambda: 1)() != 1 for p in parts):
            raise NotImplementedError("lazy concatenation of flat (1-D) partitions only")
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.starts = [0]
        for part in self.parts[:-1]:
            self.starts.append(self.starts[-1] + part.numel())

    def numel(self) -> int:
        return self.starts[-1] + self.parts[-1].numel()

    def narrow(self, dim: int, start: int, length: int) -> _LazyFlatSlice:
        if dim != 0:
            raise NotImplementedError("narrow along dim 0 only")
        return _LazyFlatSlice(self, int(start), int(length), torch.Size([int(length)]))


@dataclass
class _CheckpointFacts:
    """What the parsed files said about themselves, for the output's ``config.json``; and rank 0's module state
    (``mp_rank_00_model_states.pt``, memory-mapped), which holds the parameters no optimizer partition has."""

    zero_stage: int | None = None
    world_size: int | None = None
    global_steps: int | None = None
    ds_version: str | None = None
    files: list[str] = field(default_factory=list)
    engine: str = "deepspeed"
    sharding: str | None = None  # engine=fairscale: oss | oss_sdp | fsdp
    module_state: dict[str, Any] | None = None

    def note(self, path: Path, state: Any) -> None:
        self.files.append(path.name)
        if not isinstance(state, dict):
            return
        optim = state.get("optimizer_state_dict")
        if isinstance(optim, dict) and "zero_stage" in optim:
            self.zero_stage = int(optim["zero_stage"])
            count = optim.get("partition_count")
            self.world_size = max(count) if isinstance(count, list) else count
        # A model-states file says the run's stage and world size too; the optimizer files, when parsed, set them
        # for the partitions above whatever the order.
        if self.zero_stage is None:
            self.zero_stage = int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
        if self.world_size is None:
            self.world_size = state.get("dp_world_size")
        if path.name == "mp_rank_00_model_states.pt" and isinstance(state.get("module"), dict):
            self.module_state = state["module"]
        if "global_steps" in state:
            self.global_steps = int(state["global_steps"])
        if state.get("ds_version") is not None:
            self.ds_version = str(state["ds_version"])


class _TorchForDeepSpeedParsing:
    """``torch`` as seen by ``zero_to_fp32`` while it parses: safe ``load``, lazy ``cat``, the rest as is."""

    def __init__(self, facts: _CheckpointFacts):
        self._facts = facts

    def load(self, f: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        state = safe_torch_load(f, DEEPSPEED_GLOBALS, mmap=True)
        self._facts.note(Path(f), state)
        return state

    @staticmethod
    def cat(tensors: Sequence[Any], dim: int = 0) -> _LazyConcat:
        return _LazyConcat(tensors, dim)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def _swapped_attributes(owner: Any, **replacements: Any) -> Iterator[None]:
    originals = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(owner, name, value)


@contextlib.contextmanager
def _deepspeed_parsing(facts: _CheckpointFacts) -> Iterator[Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion is CPU work; also silences a warning
    from deepspeed.utils import zero_to_fp32

    # Its progress bars and prints would surround our one-line errors; parsing is quick (nothing is copied).
    no_progress_bar = lambda iterable, *args, **kwargs: iterable  # noqa: E731
    with (
        _swapped_attributes(zero_to_fp32, torch=_TorchForDeepSpeedParsing(facts), tqdm=no_progress_bar),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        yield zero_to_fp32


def _zero_partitioned_state(loc: CheckpointLocation) -> tuple[dict[str, TensorLike], _CheckpointFacts]:
    facts = _CheckpointFacts()
    with _deepspeed_parsing(facts) as zero_to_fp32:
        try:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(loc.root), tag=loc.tag, lazy_mode=True)
        except (FileNotFoundError, ValueError, KeyError, IndexError, NotImplementedError) as err:
            raise ConvertError(f"checkpoint {loc.path}: DeepSpeed cannot reassemble it ({err})") from err
    return _with_frozen_module_weights(dict(state), facts.module_state or {}), facts


def _with_frozen_module_weights(state: dict[str, TensorLike], module: Mapping[str, Any]) -> dict[str, TensorLike]:
    """``state`` plus the parameters the optimizer never held (frozen ones, e.g. a linear probe's encoder), from
    the module state: ``zero_to_fp32`` finds them only at stages 2-3 (``frozen_param_fragments``), while a ZeRO-1
    checkpoint keeps them in ``mp_rank_00_model_states.pt`` alone (never updated, so that copy is exact). ZeRO-3
    names its files per rank (no such module state) and records frozen parameters itself."""
    missing = {name: tensor for name, tensor in module.items() if name not in state and tensor.numel() > 0}
    return {**state, **missing}


def _zero0_state(loc: CheckpointLocation) -> tuple[dict[str, TensorLike], _CheckpointFacts]:
    facts = _CheckpointFacts()
    path = loc.path / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ConvertError(f"checkpoint {loc.path}: no mp_rank_00_model_states.pt and no *_optim_states.pt")
    state = safe_torch_load(path, DEEPSPEED_GLOBALS, mmap=True)
    facts.note(path, state)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ConvertError(f"{path} has no 'module' weights")
    if facts.zero_stage:
        raise ConvertError(
            f"checkpoint {loc.path} was saved with ZeRO stage {facts.zero_stage} but has no *_optim_states.pt "
            "files (an incomplete copy?)"
        )
    low_precision = sorted(
        {str(t.dtype) for t in module.values() if t.is_floating_point() and t.dtype != torch.float32}
    )
    if low_precision:
        raise ConvertError(
            f"checkpoint {loc.path} holds {', '.join(low_precision)} module weights and no fp32 master "
            "copy; consolidate expects this project's fp32-parameter checkpoints"
        )
    return dict(module), facts


def _fairscale_state(
    loc: CheckpointLocation, reader_stack: contextlib.ExitStack
) -> tuple[dict[str, TensorLike], _CheckpointFacts]:
    """engine=fairscale: ``model.safetensors`` already holds the full fp32 weights (rank 0 wrote the live module's
    parameters, or FSDP's gathered ones); read lazily, one tensor at a time."""
    try:
        meta = fairscale_engine.read_meta(loc.path)
    except ValueError as err:  # JSONDecodeError included
        raise ConvertError(f"checkpoint {loc.path}: {err}") from err
    reader = reader_stack.enter_context(SafetensorsReader(loc.path / meta.get("model_file", "model.safetensors")))
    facts = _CheckpointFacts(
        world_size=meta.get("world_size"),
        global_steps=meta.get("global_steps"),
        files=[reader.path.name],
        engine="fairscale",
        sharding=meta.get("sharding"),
    )
    state: dict[str, TensorLike] = dict(reader.lazy_dict())
    return state, facts


def read_run_config(loc: CheckpointLocation) -> dict[str, Any] | None:
    path = loc.path / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from err


def resolve_config(
    run_config: Mapping[str, Any] | None,
    shapes: Mapping[str, torch.Size],
    model: str | None,
    overrides: Mapping[str, Any],
) -> AdaMAEConfig:
    """The architecture to consolidate into: the run's config.json (+ overrides), or, with ``--model`` or without
    a config.json, the one the weights' shapes describe (``infer_config``: widths, depths, patch and tubelet from
    shapes; heads from ``--model`` or the size of the same width; the clip geometry from the overrides)."""
    if model is None and run_config is not None and "model" in run_config:
        return with_overrides(folder_model_config(run_config), **overrides)
    return infer_config(shapes, model=model, **overrides)


def consolidate(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    dtype: torch.dtype = torch.float32,
    model: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    ema: bool = False,
) -> dict[str, Any]:
    """Consolidate a DeepSpeed checkpoint into ``out_dir``; returns the written ``config.json``.

    A pre-training checkpoint becomes an ``adamae-full`` folder; a fine-tuning one (its config.json says
    ``task: classification``) an ``adamae-classifier`` folder, like ``adamae-finetune``'s ``RUN_DIR/model``, or
    with ``ema`` its ``RUN_DIR/model_ema`` (the model EMA kept in the checkpoint). The checkpoint is verified
    against its ``manifest.json`` (sizes and sha256) first, and a weight holding NaN/inf stops the write (nothing
    is left behind) unless ``allow_nonfinite``."""
    loc = locate_checkpoint(ckpt_dir, tag)
    problem = verify_checkpoint(loc.path) if (loc.path / MANIFEST).is_file() else None
    if problem is not None:
        raise ConvertError(f"checkpoint {loc.path} is damaged: {problem}")
    run_config = read_run_config(loc)
    num_classes = _num_classes(loc, run_config)
    if ema and num_classes is None:
        raise ConvertError(
            f"--ema: checkpoint {loc.path} is not a fine-tuning checkpoint; only adamae-finetune runs with "
            "finetune.model_ema=true keep a model EMA"
        )
    readers = contextlib.ExitStack()
    if ema:
        state, facts = _ema_state(loc)
    elif fairscale_engine.is_checkpoint(loc.path):
        state, facts = _fairscale_state(loc, readers)
    elif any(loc.path.glob("*_optim_states.pt")):
        state, facts = _zero_partitioned_state(loc)
    else:
        state, facts = _zero0_state(loc)
    shapes = {name: torch.Size(value.shape) for name, value in state.items()}
    run = run_config or {}
    if num_classes is None:
        cfg = resolve_config(run_config, shapes, model, overrides or {})
        fields = {"precision": run.get("precision"), "ds": run.get("ds"), "loss_target": run.get("loss_target")}
        description = describe(cfg)
    else:
        if model is not None:
            raise ConvertError(f"--model: checkpoint {loc.path} is a fine-tuning checkpoint; its config.json names it")
        cfg = with_overrides(folder_model_config(run), **(overrides or {}))
        attentive = _attentive(loc, run)
        fields = {
            "num_classes": num_classes,
            **({"class_names": run["class_names"]} if "class_names" in run else {}),
            **({"attentive": attentive.to_dict()} if attentive is not None else {}),
            "ds": run.get("ds"),
        }
        description = ("model EMA of " if ema else "") + describe_classifier(cfg, num_classes, attentive)
    what = f"the model EMA in checkpoint {loc.path}" if ema else f"checkpoint {loc.path}"
    expected = check_shapes(shapes, cfg, what, num_classes, attentive if num_classes is not None else None)
    ordered: dict[str, TensorLike] = {name: state[name] for name in expected}
    if not allow_nonfinite:
        ordered = {name: lazy_map(value, functools.partial(_finite, name, loc.path)) for name, value in ordered.items()}

    config = {
        "format": FORMAT_FULL if num_classes is None else FORMAT_CLASSIFIER,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        **fields,
        "source": {
            "kind": facts.engine,
            "checkpoint": str(loc.path),
            "tag": loc.tag,
            "zero_stage": facts.zero_stage,
            "world_size": facts.world_size,
            "global_steps": facts.global_steps,
            "ds_version": facts.ds_version,
            **({"sharding": facts.sharding} if facts.sharding else {}),
            **({"model_ema": ema} if num_classes is not None else {}),
        },
        "description": description,
    }
    with readers, atomic_output_dir(out_dir, overwrite, inputs=[loc.path]) as tmp:
        written = write_folder(tmp, ordered, config, dtype)
    return written


def _num_classes(loc: CheckpointLocation, run_config: Mapping[str, Any] | None) -> int | None:
    """The class count of a fine-tuning checkpoint (``adamae-finetune`` records ``task: classification``), else
    ``None``."""
    if (run_config or {}).get("task") != "classification":
        return None
    classes = (run_config or {}).get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ConvertError(f"{loc.path / RUN_CONFIG_FILE}: num_classes={classes!r}, expected a positive integer")
    return classes


def _attentive(loc: CheckpointLocation, run_config: Mapping[str, Any]) -> AttentiveSpec | None:
    """The attentive pooler a fine-tuning run with ``finetune.mode=attentive`` recorded, else ``None``."""
    values = run_config.get("attentive")
    if values is None:
        return None
    try:
        return AttentiveSpec.from_dict(values)
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(
            f"{loc.path / RUN_CONFIG_FILE}: attentive={values!r}, expected queries and num_heads"
        ) from err


def _ema_state(loc: CheckpointLocation) -> tuple[dict[str, TensorLike], _CheckpointFacts]:
    """The model EMA ``adamae-finetune`` keeps in rank 0's client state (ZeRO 0-2: the average is whole there)."""
    files = sorted(loc.path.glob("*model_states.pt"))
    if not files:
        raise ConvertError(f"checkpoint {loc.path}: no *model_states.pt, so no model EMA")
    state = safe_torch_load(files[0], DEEPSPEED_GLOBALS, mmap=True)
    facts = _CheckpointFacts()
    facts.note(files[0], state)
    ema = state.get("ema") if isinstance(state, dict) else None
    if not isinstance(ema, dict) or not ema:
        raise ConvertError(
            f"--ema: checkpoint {loc.path} holds no model EMA (the run had finetune.model_ema=false); "
            "leave out --ema for the trained weights"
        )
    return dict(ema), facts


def _finite(name: str, checkpoint: Path, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConvertError(
            f"checkpoint {checkpoint}: weight {name} holds {bad} NaN/inf values (a diverged run?); nothing written "
            "(pass --allow-nonfinite to write it anyway)"
        )
    return tensor


__all__ = ["DEEPSPEED_GLOBALS", "CheckpointLocation", "consolidate", "locate_checkpoint"]
