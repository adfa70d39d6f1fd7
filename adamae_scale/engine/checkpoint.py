"""Save policy and resume through DeepSpeed's own checkpoint format.

A checkpoint is ``RUN_DIR/checkpoints/step_00000030/`` (DeepSpeed's tag folder) plus the ``latest``
file that DeepSpeed writes after every rank has saved. Training state (the step, the data cursor)
travels in DeepSpeed's ``client_state`` as plain ints and dicts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG_FORMAT = "step_{:08d}"


def tag_for(step: int) -> str:
    return TAG_FORMAT.format(step)


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, with an fsync in between: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Decides when to save (every ``interval`` optimizer steps and at the last step) and resumes.

    A checkpoint is complete or invisible: every rank writes its files into the tag folder, all
    ranks meet at a barrier, and only then does rank 0 move the ``latest`` pointer (atomically).
    ``keep_last > 0`` deletes older tag folders once the new one is the latest.
    """

    def __init__(self, folder: str | Path, interval: int, metadata: dict[str, Any] | None = None, keep_last: int = 0):
        self.folder = Path(folder)
        self.interval = interval
        self.metadata = metadata or {}
        self.keep_last = keep_last

    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or (self.interval > 0 and step % self.interval == 0)

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Save after ``step`` optimizer steps; every rank must call this."""
        import deepspeed.comm as dist

        tag = tag_for(step)
        tag_dir = self.folder / tag
        if engine.global_rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
            # The architecture, so conversion tools can rebuild the network without the Hydra config.
            metadata = {**self.metadata, "step": step, "world_size": engine.world_size}
            atomic_write_text(tag_dir / "config.json", json.dumps(metadata, indent=2))
        # DeepSpeed's own 'latest' is written before its last barrier, while other ranks may still be
        # writing: we move the pointer ourselves once every rank is done (save_checkpoint ends in a barrier).
        engine.save_checkpoint(str(self.folder), tag=tag, client_state={**state, "step": step}, save_latest=False)
        if engine.global_rank == 0:
            atomic_write_text(self.folder / "latest", tag)
            self._prune(tag)
        dist.barrier()
        return tag_dir

    def _prune(self, newest: str) -> None:
        if self.keep_last <= 0:
            return
        tags = sorted(p.name for p in self.folder.iterdir() if TAG_PATTERN.fullmatch(p.name) and p.name <= newest)
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.folder / old, ignore_errors=True)
            shutil.rmtree(self.folder / f"{old}{UNIVERSAL_SUFFIX}", ignore_errors=True)

    def latest_tag(self) -> str | None:
        latest = self.folder / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.folder / tag).is_dir() else None

    def find(self, resume: str | None) -> CheckpointRef | None:
        """The checkpoint ``resume`` names: ``auto`` (the newest complete one, if any), ``none``, or
        a tag folder path."""
        if resume in ("none", "", None, False):
            return None
        if resume == "auto":
            tag = self.latest_tag()
            if tag is None:
                return None
            path = self.folder / tag
        else:
            path = Path(resume)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume={resume}: no checkpoint folder there")
        config = path / "config.json"
        world_size = json.loads(config.read_text()).get("world_size") if config.is_file() else None
        return CheckpointRef(path.parent, path.name, world_size)

    def load(self, engine: Any, ref: CheckpointRef) -> dict[str, Any]:
        """Load ``ref`` into the engine (model, optimizer, scheduler); returns the saved client state."""
        load_path, client_state = engine.load_checkpoint(str(ref.folder), tag=ref.tag)
        if load_path is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load checkpoint {ref.path}")
        if ref.universal:
            # A universal checkpoint carries no client state: take it from the source checkpoint.
            client_state = _read_client_state(ref.folder / ref.tag[: -len(UNIVERSAL_SUFFIX)])
        return client_state


UNIVERSAL_SUFFIX = "_universal"
TAG_PATTERN = re.compile(r"step_\d{8}")


@dataclass(frozen=True)
class CheckpointRef:
    folder: Path
    tag: str
    world_size: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.tag

    @property
    def universal(self) -> bool:
        return self.tag.endswith(UNIVERSAL_SUFFIX)


def to_universal(ref: CheckpointRef, is_rank0: bool) -> CheckpointRef:
    """DeepSpeed's universal (world-size independent) form of ``ref``, converted once by rank 0 with
    DeepSpeed's own ``ds_to_universal`` into ``TAG_universal`` (built under a temporary name, then
    renamed, so a half-converted folder is never used). Every rank must call this."""
    import deepspeed.comm as dist

    target = ref.folder / f"{ref.tag}{UNIVERSAL_SUFFIX}"
    if is_rank0 and not target.is_dir():
        tmp = ref.folder / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # A separate process: the converter forks worker pools, which must not inherit this
        # process's communication threads.
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ref.path),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ref.path} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        os.replace(tmp, target)
    dist.barrier()
    return CheckpointRef(ref.folder, target.name, ref.world_size)


def _read_client_state(tag_dir: Path) -> dict[str, Any]:
    from ..convert.consolidate import DEEPSPEED_GLOBALS
    from ..convert.io import safe_torch_load

    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"train.resume: no model_states file in {tag_dir}")
    # DeepSpeed stores it as a pickle: load it with the same allowlist the conversion tools use.
    state = safe_torch_load(files[0], DEEPSPEED_GLOBALS)
    return {k: state[k] for k in ("step", "data") if k in state}
