"""The run owns its folder: a second run started on a run_dir in use stops in one line, before any process group,
while the first runs on untouched; the lock goes with the process that held it."""

import signal
import socket
import subprocess
import sys
import time

from adamae_scale.engine import run_lock
from adamae_scale.metrics import read_metrics

from .conftest import REPO, TINY_RUN, cli_env

STEPS = 6


def pretrain_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "adamae_scale.pretrain", *overrides]


def test_a_second_run_on_a_folder_in_use_stops_in_one_line_and_the_first_finishes_untouched(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "precision=fp32", "ds=zero0", f"train.steps={STEPS}", "train.ckpt_every=3", f"run_dir={run_dir}"]
    first = subprocess.Popen(
        pretrain_cmd(*args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock, hydra_record = run_dir / run_lock.LOCK_FILE, run_dir / "hydra" / "config.yaml"
    deadline = time.monotonic() + 120
    while not (hydra_record.is_file() and lock.read_text().strip()):  # the first run holds the folder and started
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    recorded = hydra_record.stat().st_mtime_ns
    first.send_signal(signal.SIGSTOP)  # keep it mid-run while the second one tries, whatever the machine's speed
    try:
        second = subprocess.run(
            pretrain_cmd(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120
        )
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)

    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith(f"adamae-pretrain: error: run_dir={run_dir} is in use by another run (")
    assert f"host {socket.gethostname()}, pid {first.pid}, started 20" in lines[0]
    assert second.stdout == ""

    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert hydra_record.stat().st_mtime_ns == recorded  # the second run stopped before Hydra wrote its record
    # The lock went with the first process: the folder is free again (a crash or kill -9 frees it the same way).
    assert run_lock.hold(run_dir)
    run_lock.release(run_dir)
