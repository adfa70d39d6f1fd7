"""Errors a user can fix. The CLI prints each as one line, ``adamae-convert: error: ...``, and exits 2."""

from __future__ import annotations

from ..base.errors import ConvertError, UnsafeCheckpointError


class ArchitectureMismatchError(ConvertError):
    """The weights do not fit the network the user asked for (or the one the checkpoint describes)."""


__all__ = ["ArchitectureMismatchError", "ConvertError", "UnsafeCheckpointError"]
