"""Where data lives: local paths, or object storage and web servers through fsspec (``s3://``, ``gs://``,
``http(s)://``; s3fs and gcsfs come with ``pip install 'adamae_scale[cloud]'``).

Credentials are the storage libraries' own business: boto's environment variables and ``~/.aws`` files
(``AWS_ENDPOINT_URL`` names an S3-compatible endpoint), Google's application default credentials. They are
never part of a URL we print: every message made here goes through ``redact``, which drops a URL's
``user:password@`` and masks the values of the usual credential variables wherever they appear.

Writes are atomic on both sides: a local file is written under a temporary name, fsynced and renamed; an
object is uploaded in one request (an object store shows an object only once its upload completed).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Variables whose values must never appear in a message, whatever the library put them into.
SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
TRANSIENT_ATTEMPTS = 5  # reads of one object retried this many times on errors that may pass
_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


class StorageError(OSError):
    """One line: the (redacted) URL and what went wrong with it."""


def is_url(location: str | Path) -> bool:
    """A location fsspec opens (``s3://…``, ``gs://…``, ``https://…``), as opposed to a local path."""
    return isinstance(location, str) and bool(REMOTE.match(location)) and not location.startswith("file://")


def redact(text: str) -> str:
    """``text`` without secrets: URL user info removed, credential variables' values masked."""
    text = re.sub(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@", r"\g<scheme>", str(text))
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def join(base: str, name: str) -> str:
    """``base/name`` for a URL or a local path."""
    if is_url(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(base) / name)


def parent(location: str) -> str:
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it; a ``StorageError`` naming the extra to install
    when its library is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        scheme = url.split("://", 1)[0].lower()
        package = _EXTRAS.get(scheme)
        if package is None:
            raise StorageError(f"{redact(url)}: no storage library for {scheme}:// ({err})") from None
        raise StorageError(
            f"{redact(url)}: reading {scheme}:// needs {package}: pip install 'adamae_scale[cloud]'"
        ) from None


def describe(url: str, err: BaseException) -> str:
    """What went wrong with ``url``, in one line without secrets."""
    if isinstance(err, StorageError):
        return str(err)
    name = type(err).__name__
    text = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError) or name == "NoSuchBucket":
        reason = "the bucket does not exist" if "bucket" in text.lower() else "not found"
    elif isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        reason = f"permission denied ({text[:160]})" if text else "permission denied"
    elif name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        reason = (
            "no usable credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
            "~/.aws/credentials; for gs://, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    elif _is_connection_error(err):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3") else None
        where = f" {endpoint}" if endpoint else ""
        reason = f"cannot reach the storage endpoint{where} ({name}: {text[:160]})"
    else:
        reason = f"{name}: {text[:200]}"
    return redact(f"{url}: {reason}")


# Exception classes (by name: aiohttp's, botocore's, the standard library's) of a connection that failed or broke.
CONNECTION_ERRORS = {
    "ConnectionError",
    "EndpointConnectionError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "TimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
}


def _is_connection_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & CONNECTION_ERRORS) or "connect" in str(err).lower()


def _is_transient(err: BaseException) -> bool:
    """An error that a later attempt may not meet (a dropped connection, a timeout, a 5xx)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    text = str(err)
    if "AccessDenied" in text or "credentials" in text.lower() or "NoSuchBucket" in text:
        return False
    busy = ("Throttl", "SlowDown", "ServiceUnavailable", "InternalError", "503", "500 ")
    return _is_connection_error(err) or isinstance(err, OSError) or any(word in text for word in busy)


def _call(url: str, what: Any) -> Any:
    """``what()``, its errors turned into one ``StorageError`` line naming ``url``; not-found stays a
    ``FileNotFoundError`` (callers decide whether that is an error)."""
    try:
        return what()
    except FileNotFoundError as err:
        raise FileNotFoundError(describe(url, err)) from None
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(describe(url, err)) from None


def read_bytes(location: str | Path) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    url = str(location)
    fs, path = filesystem(url)
    return _call(url, lambda: fs.cat_file(path))


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return Path(location).exists()
    url = str(location)
    fs, path = filesystem(url)
    return bool(_call(url, lambda: fs.exists(path)))


def is_dir(location: str | Path) -> bool:
    if not is_url(location):
        return Path(location).is_dir()
    url = str(location)
    if url.startswith(("http://", "https://")):
        return False
    fs, path = filesystem(url)
    return bool(_call(url, lambda: fs.isdir(path)))


def size(location: str | Path) -> int | None:
    """Bytes of a file or object; ``None`` when there is none."""
    if not is_url(location):
        file = Path(location)
        return file.stat().st_size if file.is_file() else None
    url = str(location)
    fs, path = filesystem(url)
    try:
        return int(_call(url, lambda: fs.size(path)))
    except FileNotFoundError:
        return None


def sha256(location: str | Path) -> str:
    digest = hashlib.sha256()
    with open_read(location) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find(location: str, suffixes: Iterable[str]) -> list[str]:
    """Paths relative to the folder ``location`` of every file under it whose suffix is one of ``suffixes``."""
    exts = {s.lower() for s in suffixes}
    fs, root = filesystem(location)
    root = root.rstrip("/")
    found = _call(location, lambda: fs.find(root))
    return sorted(p[len(root) + 1 :] for p in found if Path(p).suffix.lower() in exts)


def names(folder: str | Path, pattern: str) -> list[str]:
    """Sorted names of the files directly in ``folder`` that match the glob ``pattern``."""
    if not is_url(folder):
        return sorted(p.name for p in Path(folder).glob(pattern))
    url = str(folder)
    fs, path = filesystem(url)
    found = _call(url, lambda: fs.glob(path.rstrip("/") + "/" + pattern))
    return sorted(p.rsplit("/", 1)[-1] for p in found)


def remove(location: str | Path) -> None:
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    url = str(location)
    fs, path = filesystem(url)
    try:
        _call(url, lambda: fs.rm_file(path))
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(location: str | Path, data: bytes) -> None:
    """The whole file or object, or (interrupted) none of it."""
    if not is_url(location):
        target = Path(location)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return
    url = str(location)
    fs, path = filesystem(url)
    _call(url, lambda: fs.pipe_file(path, data))


def upload(local: Path, location: str) -> None:
    """Publish a finished local file as the object ``location`` (one upload: seen whole or not at all)."""
    fs, path = filesystem(location)
    _call(location, lambda: fs.put_file(str(local), path))


def make_dirs(location: str | Path) -> None:
    """A local folder (with its parents); in object storage, which has no folders, a check that the bucket exists."""
    if not is_url(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    check_bucket(str(location))


def check_bucket(url: str) -> None:
    """A ``StorageError`` naming ``url`` when its bucket does not exist (s3://, gs://)."""
    if not url.startswith(("s3://", "gs://", "gcs://")):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    if not _call(url, lambda: fs.exists(bucket)):
        raise StorageError(f"{redact(url)}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")


# -- streaming reads that survive transient errors ---------------------------------------------------------------


class RetryingReader(io.RawIOBase):
    """A sequential read of one object that reopens it at the current offset when a read fails with an error
    that may pass (up to ``attempts`` times in a row, backing off); other errors (not found, permission
    denied) are raised at once as one line naming the URL."""

    def __init__(self, url: str, attempts: int = TRANSIENT_ATTEMPTS, block_size: int = 8 << 20):
        super().__init__()
        self.url, self.attempts, self.block_size = url, attempts, block_size
        self.fs, self.path = filesystem(url)
        self.offset = 0
        self.retries = 0
        self._file: Any = None
        self._open()

    def _open(self) -> None:
        def opened() -> Any:
            f = self.fs.open(self.path, "rb", block_size=self.block_size, cache_type="readahead")
            if self.offset:
                f.seek(self.offset)
            return f

        self._file = self._with_retries(opened)

    def _with_retries(self, action: Any) -> Any:
        for attempt in range(self.attempts):
            try:
                return action()
            except Exception as err:
                if not _is_transient(err) or attempt == self.attempts - 1:
                    if isinstance(err, FileNotFoundError):
                        raise FileNotFoundError(describe(self.url, err)) from None
                    raise StorageError(describe(self.url, err)) from None
                self.retries += 1
                time.sleep(min(0.2 * 2**attempt, 5.0))
                self._close_file()
        raise AssertionError("unreachable")

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def read() -> bytes:
            if self._file is None:
                self._open()
            return self._file.read(len(buffer))

        data = self._with_retries(read)
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._close_file()
        super().close()


def open_read(location: str | Path) -> io.BufferedReader:
    """A buffered binary reader of a local file or a (retrying) remote object."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    return io.BufferedReader(RetryingReader(str(location)), buffer_size=1 << 20)
