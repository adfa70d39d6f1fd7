"""Reading and writing weights safely: restricted un-pickling and streamed safetensors.

- ``safe_torch_load``: ``torch.load(weights_only=True)`` after a scan of the pickle's globals
  (``refuse_unsafe_pickle``), with an explicit allowlist of classes by name. Nothing outside tensors, plain
  containers and that list is ever constructed, so a malicious ``.pth`` is refused before any of it runs.
  The scan alone guards files that another library un-pickles in full (DeepSpeed's checkpoint loading).
- ``write_safetensors``: writes one tensor at a time (header first, from shapes), so a model is never
  held twice in memory. Values may be lazy: anything with ``shape``, ``dtype`` and ``contiguous()``
  (DeepSpeed's ``GatheredTensor`` has exactly that interface, and so does ``LazyTensor`` below).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from .errors import ConvertError, UnsafeCheckpointError

# Every class a DeepSpeed 0.19 checkpoint of this project pickles besides tensors and containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints).
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int enum: the ZeRO stage
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # two floats/bools: the (static) loss scale
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints: a parameter's slice
)


# -- restricted un-pickling ------------------------------------------------------------------------
def _resolve_global(qualified_name: str) -> Any:
    module_name, _, attr = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _first_informative_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line or line.startswith("Unsupported operand"):
            return line
    return lines[0] if lines else type(err).__name__


def _globals_in_pickles(path: Path, max_pickles: int = 8) -> set[str]:
    """Classes and functions named by the pickles at the start of a non-zip file, read as opcodes only.

    PyTorch's legacy format is a few pickles in a row (magic number, versions, the object, storage keys)
    followed by raw storage bytes; a plain ``pickle.dump`` file is one pickle. Scanning stops at the first
    thing that is not a pickle.
    """
    found: set[str] = set()
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            recent_strings: list[str] = []
            try:
                for opcode, arg, _pos in pickletools.genops(f):
                    if opcode.name == "GLOBAL":
                        found.add(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(recent_strings) >= 2:
                        found.add(f"{recent_strings[-2]}.{recent_strings[-1]}")
                    elif isinstance(arg, str) and "UNICODE" in opcode.name:
                        recent_strings.append(arg)
            except Exception:  # noqa: BLE001 - not (or no longer) a pickle: the rest is data
                break
    return found


def safe_torch_load(path: str | os.PathLike[str], allowed_globals: Sequence[str] = (), mmap: bool = True) -> Any:
    """Load a PyTorch checkpoint with ``weights_only=True`` plus exactly ``allowed_globals``.

    ``allowed_globals`` are fully qualified class names (``"argparse.Namespace"``). The pickle's globals are
    checked first by ``refuse_unsafe_pickle`` (nothing is executed); older formats rely on the ``weights_only``
    un-pickler too, which refuses them as well. ``mmap=True`` maps zip files instead of reading them, so only
    the tensors used are paged in.
    """
    path = Path(path)
    needed = [_resolve_global(name) for name in sorted(refuse_unsafe_pickle(path, allowed_globals))]
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(needed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        line = _first_informative_line(err)
        if "GLOBAL" in line or "global" in line:
            raise UnsafeCheckpointError(f"refusing to load {path}: {line}") from err
        raise ConvertError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({line})") from err
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere in the un-pickler (KeyError, …)
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({_first_informative_line(err)})") from err


def refuse_unsafe_pickle(path: str | os.PathLike[str], allowed_globals: Sequence[str] = ()) -> set[str]:
    """Read the globals ``path``'s pickle names, without executing any of it, and raise
    ``UnsafeCheckpointError`` (naming the file and each global) when one is neither a tensor, a plain
    container nor in ``allowed_globals``. Returns the ``allowed_globals`` it names (to allow when loading).

    For zip files (everything ``torch.save`` wrote since PyTorch 1.6) PyTorch lists the globals; for the
    legacy format and plain pickles the opcodes are read.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # every pickle of protocol 2+ (torch's legacy format) starts so
            raise ConvertError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive written by torch.save nor a pickle)"
            )
    allowed = set(allowed_globals)
    if is_zip:
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as err:  # noqa: BLE001 - any parse failure means we cannot vouch for it
            raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({_first_informative_line(err)})") from err
    else:
        found = _globals_in_pickles(path)
    refused = sorted(name for name in found - allowed if not _allowed_by_default(name))
    if refused:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle references {', '.join(refused)}, which is not a tensor or plain "
            "container and could run code when un-pickled (only weights are loaded, with weights_only=True)"
        )
    return found & allowed


def _allowed_by_default(name: str) -> bool:
    """Whether PyTorch's weights-only un-pickler accepts ``name`` without an allowlist (tensor rebuilders,
    storages, ``collections.OrderedDict``, ...). Zip files only list the others; legacy files list all."""
    allowed_by_torch = getattr(getattr(torch, "_weights_only_unpickler", None), "_get_allowed_globals", dict)
    return name in allowed_by_torch()  # without that private table, legacy files are refused (never let through)


# -- lazy tensors -----------------------------------------------------------------------------------
class TensorLike(Protocol):
    """A tensor, or a stand-in that knows its shape and dtype and produces its data on ``contiguous()``."""

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def contiguous(self) -> torch.Tensor: ...


class LazyTensor:
    """Shape and dtype now, data later: ``contiguous()`` calls ``load`` (and checks what it returns)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, load: Callable[[], torch.Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._load = load

    def contiguous(self) -> torch.Tensor:
        tensor = self._load()
        if tuple(tensor.shape) != tuple(self.shape) or tensor.dtype != self.dtype:
            raise AssertionError(
                f"lazy tensor promised {list(self.shape)} {self.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        return tensor.contiguous()

    def __repr__(self) -> str:
        return f"LazyTensor({list(self.shape)}, {self.dtype})"


def lazy_map(
    source: TensorLike,
    fn: Callable[[torch.Tensor], torch.Tensor],
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> LazyTensor:
    """``fn(source)`` computed when written; ``shape``/``dtype`` default to the source's."""
    return LazyTensor(
        source.shape if shape is None else shape,
        source.dtype if dtype is None else dtype,
        lambda: fn(source.contiguous()),
    )


# -- safetensors --------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def _output_dtype(value: TensorLike, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and value.dtype.is_floating_point else value.dtype


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``tensors`` (in their order) as a safetensors file, one tensor in memory at a time.

    ``dtype`` casts floating-point tensors on the way out (e.g. ``torch.bfloat16``). The layout is the
    safetensors format: an 8-byte little-endian header length, a JSON header (padded with spaces to a
    multiple of 8) giving each tensor's dtype, shape and byte range, then the raw little-endian data.
    """
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        raise ConvertError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    offset = 0
    for name, value in tensors.items():
        out_dtype = _output_dtype(value, dtype)
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise ConvertError(f"{name}: dtype {out_dtype} cannot be written to safetensors")
        nbytes = math.prod(value.shape) * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[out_dtype],
            "shape": [int(s) for s in value.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, value in tensors.items():
            data = value.contiguous()
            out_dtype = _output_dtype(value, dtype)
            if tuple(data.shape) != tuple(value.shape):
                raise AssertionError(f"{name}: expected shape {list(value.shape)}, got {list(data.shape)}")
            if data.dtype != out_dtype:
                data = data.to(out_dtype)
            # A uint8 view of the (contiguous, CPU) data: written straight from its memory, no copy.
            f.write(data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del data
        f.flush()
        os.fsync(f.fileno())


class SafetensorsReader:
    """Lazy access to a safetensors file: names, shapes and dtypes from the header, data on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self._file = self._handle.__enter__()
            self._keys = list(self._file.offset_keys())  # the order they were written in
        except (SafetensorError, OSError) as err:
            raise ConvertError(
                f"{self.path}: not a readable safetensors file ({_first_informative_line(err)})"
            ) from err

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})

    def lazy(self, name: str) -> LazyTensor:
        piece = self._file.get_slice(name)
        dtype = _TORCH_DTYPES.get(piece.get_dtype())
        if dtype is None:
            raise ConvertError(
                f"{self.path}: tensor {name} has dtype {piece.get_dtype()}, which this tool does not handle"
            )
        return LazyTensor(piece.get_shape(), dtype, lambda: self._file.get_tensor(name))

    def lazy_dict(self) -> dict[str, LazyTensor]:
        return {name: self.lazy(name) for name in self._keys}

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEEPSPEED_GLOBALS",
    "LazyTensor",
    "SafetensorsReader",
    "TensorLike",
    "lazy_map",
    "refuse_unsafe_pickle",
    "safe_torch_load",
    "write_safetensors",
]
