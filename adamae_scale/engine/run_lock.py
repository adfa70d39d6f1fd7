"""The run owns its folder: an exclusive lock on ``RUN_DIR/run.lock`` for the run's lifetime.

One process holds it: global rank 0 (the only one on a single-process run), from before Hydra writes into
the folder and before any process group starts, until the process ends. It is an ``flock`` on an open file,
which the kernel releases when the process ends however it ends (exit, crash, ``kill -9``), so a crash never
leaves a stale lock behind. The file stays, naming the last holder (host, pid, start time); a second run on a
held folder reads it and stops with one line naming the holder.

Some network filesystems have no working locks (Lustre mounted without ``flock``, some NFS and FUSE mounts):
``flock`` fails there, or succeeds without excluding anyone. Both are detected (the second by asking a
separate process to take the same lock) and said in one warning line; the run then goes on unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCK_FILE = "run.lock"
# flock's answers on a filesystem that does not implement it.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# A separate process tries the lock: exit 0 when it is refused (locks work), 1 when it got it.
_PROBE = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "except OSError:\n"
    "    sys.exit(0)\n"
    "sys.exit(1)\n"
)

_held: dict[Path, int] = {}  # run folder → the open, locked file descriptor (for the process's lifetime)


class RunDirBusy(RuntimeError):
    """Another live run holds the run folder."""


def hold(run_dir: str | os.PathLike[str]) -> bool:
    """Lock ``run_dir`` (created if missing) for the rest of this process's life; again in the same process:
    nothing. Returns whether the lock is held (``False`` on a filesystem without working locks, after a
    warning on stderr). Raises ``RunDirBusy`` (one line naming the holder) when another run holds it."""
    folder = Path(run_dir)
    key = folder.resolve()
    if key in _held:
        return True
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(
            f"run_dir={folder} is in use by another run ({holder(path)}); wait for it to end, stop it, "
            "or choose another run_dir"
        ) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in _NO_LOCKS:
            raise
        _warn_unprotected(folder, f"flock: {os.strerror(err.errno)}")
        return False
    if not _excludes_other_processes(path):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        _warn_unprotected(folder, "a second process could take the same lock")
        return False
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd
    return True


def release(run_dir: str | os.PathLike[str]) -> None:
    """Give the lock back before the process ends (a process that runs several runs in turn)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holder(path: Path) -> str:
    """Who holds (or last held) the lock file ``path``: ``host H, pid P, started T``."""
    try:
        record = json.loads(path.read_text())
        return f"host {record['host']}, pid {record['pid']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _excludes_other_processes(path: Path) -> bool:
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(path)], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # no way to tell: trust flock
    return probe.returncode == 0


def _warn_unprotected(folder: Path, why: str) -> None:
    print(
        f"[adamae] warning: run_dir={folder} is on a filesystem without working file locks ({why}): nothing "
        "stops a second run from writing into this folder at the same time; make sure only one run uses it",
        file=sys.stderr,
        flush=True,
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
