"""Command-line runs for the test suite without paying the imports each time.

Most tests run a command as a user does (``python -m adamae_scale.pretrain ...``), and most of such a run's CPU
time on a 2-core machine is importing torch, DeepSpeed (whose engine imports ``torch._dynamo``), timm,
torchvision, Hydra and TensorBoard: about 9 of its 13 seconds. A fork server imports them once per pytest
worker; each run is then a fork of it that sets the command's argv, environment, working directory and
standard streams and executes the module (or script) as ``__main__``, as ``python -m`` / ``python SCRIPT``
would, and exits with its status. Nothing has run in the server but imports: no process group, no Hydra, no
threads (checked), so the child starts where a fresh process would after its imports.

A one-node ``torchrun`` of such a command (what ``tests.conftest.torchrun_cmd`` builds) runs as that many forks
started together, each with the environment torchrun gives its workers (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` ...): real ranks on gloo, as a launcher
that sets the environment (SLURM's ``srun``) starts them. As under torchrun, the first rank that fails stops the
others (SIGTERM, then SIGKILL after 30 s). Tests of the launchers themselves start them as processes.

The server starts with the environment pytest started with. A run whose environment differs from it in a
variable the test set for that run (other than ``RUN_TIME_VARIABLES``) uses a fresh process, as does every run when
``ADAMAE_TESTS_FRESH=1``; what in-process code set in pytest's own environment since does not count (see ``serves``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = r"""
import json, os, runpy, signal, sys, threading, time, traceback

requests = os.fdopen(os.dup(0), "r")
replies = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(2, 1)  # an import that prints must not write into the reply channel

import torch, torchvision, deepspeed, hydra, timm.layers, timm.optim  # noqa: E401
import torch._dynamo  # DeepSpeed's engine imports it (its Muon optimizer is compiled on import)
from torch.utils.tensorboard import SummaryWriter  # noqa: F401
import adamae_scale.pretrain, adamae_scale.finetune.run, adamae_scale.convert.cli  # noqa: E401
import adamae_scale.bench, adamae_scale.visual.cli, adamae_scale.data.shards_cli  # noqa: E401

assert threading.active_count() == 1, threading.enumerate()  # a fork copies only the calling thread
replies.write("ready\n")
replies.flush()


def child(request):
    requests.close()
    replies.close()
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    target = request["target"]
    if target.startswith("-m "):
        name = target[3:]
        for loaded in (name, name + ".__main__"):  # executed afresh as __main__, as ``python -m`` does
            sys.modules.pop(loaded, None)
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")


def wait_all(pids):
    # Every rank's exit status; when one fails the others get SIGTERM, then SIGKILL after 30 s, as torchrun does.
    codes, stop_at = {}, None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if stop_at is not None and time.monotonic() > stop_at:
                for other in set(pids) - set(codes):
                    os.kill(other, signal.SIGKILL)
                stop_at = float("inf")
            time.sleep(0.02)
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and stop_at is None:
            for other in set(pids) - set(codes):
                os.kill(other, signal.SIGTERM)
            stop_at = time.monotonic() + 30
    return [codes[pid] for pid in pids]


for line in requests:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in request["ranks"]:
        pid = os.fork()
        if pid == 0:
            try:
                child({**request, **rank})
            except SystemExit:
                raise
            except BaseException:
                traceback.print_exc()
                sys.exit(1)
            sys.exit(0)
        pids.append(pid)
    replies.write(json.dumps({"pids": pids}) + "\n")
    replies.flush()
    replies.write(json.dumps({"returncodes": wait_all(pids)}) + "\n")
    replies.flush()
"""


# Read by our code when a run reads them, never at import: tests pass them to a run on purpose.
RUN_TIME_VARIABLES = ("ADAMAE_",)


class ForkServer:
    def __init__(self, env: dict[str, str], cwd: Path):
        self.env, self.cwd = dict(env), cwd
        self.logs = Path(tempfile.mkdtemp(prefix="adamae-forkserver-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.logs / "server.log", "w"),  # noqa: SIM115 (the server's lifetime)
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {(self.logs / 'server.log').read_text()[-3000:]}")
        self.count = 0

    def serves(self, env: dict[str, str]) -> bool:
        if os.environ.get("ADAMAE_TESTS_FRESH") == "1" or self.proc.poll() is not None:
            return False
        # A difference the pytest process itself now has was made after its imports (and the server's, which started
        # from the environment pytest started with): torch setting TORCHINDUCTOR_CACHE_DIR or
        # PYTORCH_NVML_BASED_CUDA_CHECK, Ray its RAY_* variables, pytest PYTEST_CURRENT_TEST, a test's monkeypatch.
        # Only what a test passes to the run itself (cli_env(FOO=...), its own dict) needs a fresh process.
        keys = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return all(k.startswith(RUN_TIME_VARIABLES) or env.get(k) == os.environ.get(k) for k in keys)

    def run(self, cmd: list[str], envs: list[dict[str, str]], timeout: float) -> subprocess.CompletedProcess:
        """``cmd`` (``[python, "-m", MODULE, ...]`` or ``[python, SCRIPT, ...]``) as one forked run per environment in
        ``envs`` (ranks, started together); the output is theirs in order, the exit status 0 when every run exits
        0 (one run: its own status; several: 1 otherwise, as torchrun's)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd[1] == "-m":
            target, argv = f"-m {cmd[2]}", [cmd[2], *cmd[3:]]
        else:
            target, argv = cmd[1], cmd[1:]
        ranks = []
        for env in envs:
            self.count += 1
            out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
            ranks.append({"env": env, "stdout": str(out), "stderr": str(err)})
        request = {"target": target, "argv": argv, "cwd": str(self.cwd), "ranks": ranks}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pids = json.loads(self.proc.stdout.readline())["pids"]
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        codes = json.loads(self.proc.stdout.readline())["returncodes"]
        stdout = stderr = ""
        for rank in ranks:
            for key in ("stdout", "stderr"):
                path = Path(rank[key])
                text = path.read_text(errors="replace")
                path.unlink()
                stdout, stderr = (stdout + text, stderr) if key == "stdout" else (stdout, stderr + text)
        if not ready:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        returncode = codes[0] if len(codes) == 1 else int(any(codes))
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for path in self.logs.iterdir():
            path.unlink()
        self.logs.rmdir()


_server: ForkServer | None = None


def run_command(
    cmd: list[str], env: dict[str, str], cwd: Path, timeout: float, server_env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``cmd`` as ``subprocess.run(..., capture_output=True, text=True)`` would run it: through the fork server
    (started on first use with ``server_env``) when it is a Python command (``-m MODULE`` or a script), or a
    one-node torchrun of one (``torchrun_ranks``), whose environment the server can serve."""
    global _server
    launch = torchrun_ranks(cmd, env)
    python_cmd, envs = launch if launch is not None else (cmd, [env])
    ours = len(python_cmd) > 2 and python_cmd[1] == "-m" and python_cmd[2].startswith("adamae_scale")
    script = len(python_cmd) > 1 and python_cmd[1].endswith(".py")
    tests_module = len(python_cmd) > 2 and python_cmd[1] == "-m" and python_cmd[2].startswith("tests.")
    python = python_cmd[0] == sys.executable and (ours or script or tests_module)
    if python and os.environ.get("ADAMAE_TESTS_FRESH") != "1":
        if _server is None:
            _server = ForkServer(server_env, cwd)
        if _server.serves(env) and Path(cwd) == _server.cwd:
            return _server.run(python_cmd, envs, timeout)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# What ``tests.conftest.torchrun_cmd`` builds: torchrun of N ranks on this node with a given master address and port.
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", None, "--master_addr", None, "--master_port", None]


def torchrun_ranks(cmd: list[str], env: dict[str, str]) -> tuple[list[str], list[dict[str, str]]] | None:
    """A one-node ``torchrun --nproc_per_node N --master_addr A --master_port P TARGET ...`` as the Python command
    each worker runs and the N environments torchrun gives its workers (rank, local rank, world sizes, master
    address and port; the rendezvous store is then rank 0's, as without torchrun's agent). None for other commands."""
    head = cmd[1 : 1 + len(TORCHRUN)]
    if cmd[0] != sys.executable or len(head) < len(TORCHRUN):
        return None
    if any(want is not None and got != want for got, want in zip(head, TORCHRUN, strict=True)):
        return None
    nproc, addr, port = int(head[3]), head[5], head[7]
    python_cmd = [sys.executable, *cmd[1 + len(TORCHRUN) :]]
    envs = []
    for rank in range(nproc):
        ranks = {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "ROLE_RANK": rank}
        sizes = {"WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc, "GROUP_WORLD_SIZE": 1, "ROLE_WORLD_SIZE": nproc}
        launch = {"MASTER_ADDR": addr, "MASTER_PORT": port, "ROLE_NAME": "default", "TORCHELASTIC_RESTART_COUNT": 0}
        envs.append({**env, **{k: str(v) for k, v in {**ranks, **sizes, **launch}.items()}})
    return python_cmd, envs


def close() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None
