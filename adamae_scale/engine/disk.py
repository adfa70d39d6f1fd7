"""Free disk space, checked before anything large is written."""

from __future__ import annotations

import shutil
from pathlib import Path


class InsufficientSpaceError(OSError):
    """Less free space than a write is expected to need (the message says how much of each)."""


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Raise ``InsufficientSpaceError`` (one line) when the filesystem holding ``folder`` (or its nearest existing
    parent) has less than ``need_bytes`` free."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise InsufficientSpaceError(
            f"not enough free disk space for {what} in {folder}: about {gigabytes(need_bytes)} needed, "
            f"{gigabytes(free)} free on that filesystem"
            " (free some space, set train.keep_last, or choose another run_dir)"
        )


def gigabytes(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"
