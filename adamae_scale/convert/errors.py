"""Errors a user can fix. The CLI prints each as one line, ``adamae-convert: error: ...``, and exits 2."""

from __future__ import annotations


class ConvertError(Exception):
    """A wrong path, a wrong option or a checkpoint this tool cannot convert."""

    def __init__(self, message: str):
        # One line, whatever the cause carried (tracebacks and library messages often span several).
        super().__init__(" ".join(str(message).split()))


class UnsafeCheckpointError(ConvertError):
    """The file's pickle references something other than tensors and plain containers."""


class ArchitectureMismatchError(ConvertError):
    """The weights do not fit the network the user asked for (or the one the checkpoint describes)."""


__all__ = ["ArchitectureMismatchError", "ConvertError", "UnsafeCheckpointError"]
