import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adamae_scale.models import AdaMAEConfig, config_for

from . import forkserver

REPO = Path(__file__).resolve().parents[1]

# A model small enough for CI (2 cores) that still runs every stage of the real pipeline.
TINY_MODEL = [
    "model=vit_tiny",
    "model.depth=2",
    "model.decoder_depth=1",
    "model.num_frames=4",
    "model.img_size=[32,32]",
    "model.patch_size=8",
    "masking.ratio=0.75",
]
TINY_RUN = [
    *TINY_MODEL,
    "data=synthetic",
    "train.micro_batch_size=4",
    "train.base_lr=0.4",
    "train.min_lr=0.04",
    "train.warmup_fraction=0.1",
    "train.clip_grad=1.0",
    "eval.focus_batches=1",
]


# The environment pytest started with, before any in-process test (torch, Ray, monkeypatch) changed os.environ:
# the fork server's (tests/forkserver.py), since pytest imported torch & co. under it too.
SESSION_ENV = dict(os.environ)


def cli_env(*, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(cmd: list, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)`` with ``cli_env()`` unless told; Python
    commands through the fork server (``tests/forkserver.py``)."""
    server_env = cli_env(base=SESSION_ENV)
    return forkserver.run_command([str(c) for c in cmd], env or cli_env(), REPO, timeout, server_env=server_env)


def _run(cmd: list[str], check: bool, timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_command(cmd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_pretrain(
    *overrides: str, check: bool = True, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``adamae-pretrain`` as a user runs it: a fresh process with Hydra overrides."""
    return _run([sys.executable, "-m", "adamae_scale.pretrain", *overrides], check, timeout, env)


PRETRAIN = ("-m", "adamae_scale.pretrain")


def torchrun_cmd(nproc: int, *overrides: str, port: int | None = None, target: tuple[str, ...] = PRETRAIN) -> list[str]:
    """``torchrun`` on 127.0.0.1 launching ``target`` (a module as ``-m NAME [ARGS]``, or a script) with
    ``overrides``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
        *target,
        *overrides,
    ]


def run_torchrun(
    nproc: int, *overrides: str, check: bool = True, timeout: int = 400, target: tuple[str, ...] = PRETRAIN
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N`` of ``target`` (``-m adamae_scale.pretrain`` unless told): N CPU ranks on gloo."""
    return _run(torchrun_cmd(nproc, *overrides, target=target), check, timeout)


def run_ranks(nproc: int, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """One process without a launcher, or ``nproc`` ranks under torchrun."""
    return run_pretrain(*overrides, **kwargs) if nproc == 1 else run_torchrun(nproc, *overrides, **kwargs)


STATE_DUMP_SCRIPT = Path(__file__).with_name("pretrain_with_master_dump.py")


def run_dumping_state(
    nproc: int, master: Path, *overrides: str, optimizer: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Pre-train like ``run_ranks``, then write the live engine's fp32 master weights to ``master`` and, when
    ``optimizer`` is given, its AdamW moments there (safetensors)."""
    script = (str(STATE_DUMP_SCRIPT),)
    cmd = [sys.executable, *script, *overrides] if nproc == 1 else torchrun_cmd(nproc, *overrides, target=script)
    dumps = {"ADAMAE_MASTER_DUMP": str(master)}
    if optimizer is not None:
        dumps["ADAMAE_OPTIMIZER_DUMP"] = str(optimizer)
    return _run(cmd, True, timeout, cli_env(**dumps))


@pytest.fixture
def tiny_run():
    return list(TINY_RUN)


def convert_cli(capsys, *args) -> tuple[int, str, str]:
    """``adamae-convert ARGS`` in this process: (exit code, stdout, stderr)."""
    from adamae_scale.convert import cli

    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, prog: str = "adamae-convert") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def checkpointing_config() -> AdaMAEConfig:
    """A 3-block model with drop path, for the checks that recomputed (checkpointed) blocks give equal gradients."""
    return config_for(
        "vit_tiny",
        num_frames=4,
        img_size=[32, 32],
        patch_size=8,
        depth=3,
        decoder_depth=2,
        mask_ratio=0.75,
        drop_path=0.1,
    )


@pytest.fixture(scope="session", autouse=True)
def _close_the_fork_server():
    yield
    forkserver.close()
