"""Real services for the tests, every one bound to and addressed on 127.0.0.1: an S3-protocol server (moto's
standalone ``moto_server``) and a Google Cloud Storage emulator (``gcp-storage-emulator``) in subprocesses, and a
local Ray cluster."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .conftest import free_port

# Distinct, greppable credentials: no output or file of a run may contain them.
ACCESS_KEY_ID = "AKIDADAMAETESTKEY7Q"
SECRET_ACCESS_KEY = "s3cr3t-adamae-Xq9vLp2RwT8mZ"


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on 127.0.0.1:{port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@contextlib.contextmanager
def _serving(command: list[str], port: int, what: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """``command`` (a server of this venv) running until the block ends, once it listens on 127.0.0.1:``port``."""
    binary = Path(sys.executable).with_name(command[0])
    process = subprocess.Popen(
        [str(binary), *command[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_for_port(port, process, what)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """An S3 server on 127.0.0.1 and a free port, for the time of the block; yields its endpoint URL."""
    port = free_port()
    with _serving(["moto_server", "-H", "127.0.0.1", "-p", str(port)], port, "moto_server", env):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def gcs_emulator(bucket: str) -> Iterator[dict[str, str]]:
    """A Google Cloud Storage emulator on 127.0.0.1 and a free port holding an empty ``bucket``, for the time of the
    block; yields the environment that points gcsfs at it."""
    port = free_port()
    command = ["gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]
    with _serving([*command, "--default-bucket", bucket], port, "gcp-storage-emulator"):
        yield {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            # gcsfs's default filesystem first asks the bucket's type over gRPC, which the emulator does not serve.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }


def s3_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """What a user's shell gives the S3 clients: the endpoint and credentials in the environment, no config
    files, and no instance-metadata lookups (which would send traffic off this machine)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        **extra,
    }


# Ray picks the machine's routable address for its services, even when told 127.0.0.1, unless it runs as it
# does on a laptop: then every Ray service is addressed on 127.0.0.1.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """A Ray cluster of this process on 127.0.0.1 for the time of the block; yields its address (for drivers in
    other processes: ``--ray-address``)."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # read when Ray is imported
    import ray

    try:
        context = ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        address = context.address_info["gcs_address"]
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` that drops the first ``cuts`` connections whose
    response passes ``cut_after`` bytes, there: a network that fails in the middle of downloads for a while."""

    def __init__(self, target_port: int, cut_after: int, cuts: int = 1):
        import threading

        self.target_port, self.cut_after = target_port, cut_after
        self.cuts, self.cuts_left = 0, cuts
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                if response and self.cuts_left > 0 and passed + len(data) > self.cut_after:
                    sink.sendall(data[: self.cut_after - passed])
                    self.cuts_left -= 1
                    self.cuts += 1
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._stop = True
        self.server.close()
