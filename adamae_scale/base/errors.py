"""Errors of reading and writing weights that a user can fix; each is one line."""

from __future__ import annotations


class ConvertError(Exception):
    """A wrong path, a wrong option or a checkpoint this tool cannot convert."""

    def __init__(self, message: str):
        # One line, whatever the cause carried (tracebacks and library messages often span several).
        super().__init__(" ".join(str(message).split()))


class UnsafeCheckpointError(ConvertError):
    """The file's pickle references something other than tensors and plain containers."""


__all__ = ["ConvertError", "UnsafeCheckpointError"]
