"""Writing files and folders so that a reader, or a crash, never sees them half-written: the one place that
does write-then-rename.

- ``atomic_write_text``: a file written beside its target, flushed to disk, then renamed over it.
- ``atomic_output_dir``: a folder filled beside its target, renamed into place only once complete (an old one
  moved aside first); a failure leaves no partial output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConvertError


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, with an fsync in between: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(
    out_dir: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; on success it becomes ``out_dir``.

    ``out_dir`` must not exist unless ``overwrite``; then the old folder is moved aside, the new one
    renamed in, and the old one deleted, so there is never a moment with a half-written ``out_dir``.
    ``inputs`` are the paths being read: writing over one of them (or a folder holding one) is refused.
    """
    out_dir = Path(out_dir).absolute()
    for source in inputs:
        source = Path(source).absolute()
        if source == out_dir or out_dir in source.parents:
            raise ConvertError(f"OUT_DIR {out_dir} would replace the input {source}; choose another folder")
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"OUT_DIR {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"OUT_DIR {out_dir} exists and is not a folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvertError(f"cannot create the parent folder of OUT_DIR {out_dir} ({err.strerror})") from err
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """``payload`` as indented JSON, written atomically."""
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=False) + "\n")


__all__ = ["atomic_output_dir", "atomic_write_text", "write_json"]
