"""Save policy and resume through DeepSpeed's own checkpoint format.

A checkpoint is ``RUN_DIR/checkpoints/step_00000030/`` (DeepSpeed's tag folder) plus the ``latest``
file that DeepSpeed writes after every rank has saved. Training state (the step, the data cursor)
travels in DeepSpeed's ``client_state`` as plain ints and dicts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TAG_FORMAT = "step_{:08d}"


def tag_for(step: int) -> str:
    return TAG_FORMAT.format(step)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Decides when to save (every ``interval`` optimizer steps and at the last step) and resumes."""

    def __init__(self, folder: str | Path, interval: int, metadata: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.interval = interval
        self.metadata = metadata or {}

    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or (self.interval > 0 and step % self.interval == 0)

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        """Save after ``step`` optimizer steps; every rank must call this."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tag = tag_for(step)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state={"step": step, **state})
        if engine.global_rank == 0:
            # The architecture, so conversion tools can rebuild the network without the Hydra config.
            atomic_write_text(self.folder / tag / "config.json", json.dumps(self.metadata, indent=2))
        return self.folder / tag

    def latest_tag(self) -> str | None:
        latest = self.folder / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.folder / tag).is_dir() else None

    def resume(self, engine, resume: str) -> dict[str, Any] | None:
        """``resume``: ``auto`` (newest checkpoint if any), ``none``, or a checkpoint tag folder path.

        Returns the saved client state, or ``None`` when starting fresh.
        """
        if resume in ("none", "", None, False):
            return None
        if resume == "auto":
            tag = self.latest_tag()
            if tag is None:
                return None
            folder = self.folder
        else:
            path = Path(resume)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume={resume}: no checkpoint folder there")
            folder, tag = path.parent, path.name
        load_path, client_state = engine.load_checkpoint(str(folder), tag=tag)
        if load_path is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load checkpoint {folder / tag}")
        return client_state
