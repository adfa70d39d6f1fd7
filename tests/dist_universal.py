"""Run by ``test_reliability.py`` as 2 real processes (gloo): every rank asks for the universal form of the
checkpoint ``sys.argv[1]`` (rank 0 converts) and writes what it got to ``sys.argv[2]/rank{r}.txt``."""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from adamae_scale.engine.checkpoint import CheckpointRef, NoUsableCheckpoint, to_universal


def main() -> None:
    tag, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A short timeout: a rank left waiting for rank 0 fails the test in a minute instead of half an hour.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        got = to_universal(CheckpointRef(tag.parent, tag.name, {"world_size": world}), is_rank0=rank == 0).tag
    except NoUsableCheckpoint as err:
        got = f"NoUsableCheckpoint: {err}"
    (out / f"rank{rank}.txt").write_text(got)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
