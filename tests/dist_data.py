"""Run by ``test_pipeline.py`` as N real processes (gloo): one epoch per rank, and a straight vs a resumed
stream, where the resumed one loads the state that rank 0 saved. Writes ``OUT/rank{r}.json``."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from adamae_scale.data.pipeline import ShardClips, ShardDataConfig


def summary(batch) -> dict:
    return {
        "key": batch["key"],
        "epoch": batch["epoch"].tolist(),
        "label": batch["label"].tolist(),
        "sum": float(batch["video"].double().sum()),
        "shape": list(batch["video"].shape),
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, batch, first, then = ShardDataConfig(**args["cfg"]), args["batch_size"], args["first"], args["then"]
    result: dict = {}

    # One epoch on this rank: every clip until one of epoch 1 shows up.
    stream = ShardClips(cfg, batch, rank, world)
    result["epoch0"] = []
    while True:
        got = next(stream)
        result["epoch0"] += [k for k, e in zip(got["key"], got["epoch"].tolist(), strict=True) if e == 0]
        if max(got["epoch"].tolist()) > 0:
            break
    stream.close()

    straight = ShardClips(cfg, batch, rank, world)
    result["straight"] = [summary(next(straight)) for _ in range(first + then)]
    straight.close()

    interrupted = ShardClips(cfg, batch, rank, world)
    result["resumed"] = [summary(next(interrupted)) for _ in range(first)]
    state = interrupted.state_dict()  # collective: gathers every rank's position
    interrupted.close()
    if rank == 0:  # DeepSpeed keeps rank 0's client state only
        (out / "state.json").write_text(json.dumps(state))
    dist.barrier()
    resumed = ShardClips(cfg, batch, rank, world)
    resumed.load_state_dict(json.loads((out / "state.json").read_text()))
    result["resumed"] += [summary(next(resumed)) for _ in range(then)]
    result["metrics"] = resumed.metrics()  # collective: summed over ranks
    resumed.close()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
