"""Save policy and resume through DeepSpeed's own checkpoint format.

A checkpoint is ``RUN_DIR/checkpoints/step_00000030/`` (DeepSpeed's tag folder) plus the ``latest``
file that DeepSpeed writes after every rank has saved. Training state (the step, the data cursor)
travels in DeepSpeed's ``client_state`` as plain ints and dicts.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.atomic import atomic_write_text
from ..base.collectives import any_rank, barrier, gather_objects, rank_and_world
from .disk import check_free_space
from .interface import TrainingEngine

TAG_FORMAT = "step_{:08d}"


def tag_for(step: int) -> str:
    return TAG_FORMAT.format(step)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error): the partial folder has been removed."""


class NoUsableCheckpoint(ValueError):
    """``train.resume`` names no checkpoint that verifies."""


class Checkpointer:
    """Decides when to save (every ``interval`` optimizer steps and at the last step), writes, verifies, resumes.

    A checkpoint is complete or invisible: every rank writes its files into the tag folder, all ranks meet at
    a barrier, the ranks checksum the files (each a share), and rank 0 writes ``manifest.json`` (sizes and
    sha256 of every file) last, atomically, then moves the ``latest`` pointer. A failed save removes its
    partial folder. ``resume=auto`` verifies the newest checkpoint against its manifest and falls back to the
    newest one that verifies. ``keep_last > 0`` deletes older tag folders once the new one is the latest.
    """

    def __init__(
        self,
        folder: str | Path,
        interval: int,
        metadata: dict[str, Any] | None = None,
        keep_last: int = 0,
        size_estimate_bytes: int = 0,
    ):
        self.folder = Path(folder)
        self.interval = interval
        self.metadata = metadata or {}
        self.keep_last = keep_last
        self.size_estimate_bytes = size_estimate_bytes  # used before the first checkpoint exists
        self.log: Callable[[str], None] = _print_rank0

    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or (self.interval > 0 and step % self.interval == 0)

    def save(self, engine: TrainingEngine, step: int, state: dict[str, Any]) -> Path:
        """Save after ``step`` optimizer steps; every rank must call this."""
        tag = tag_for(step)
        tag_dir = self.folder / tag
        rank, world = rank_and_world()
        # Every rank checks (the folder is shared), so all of them stop together.
        check_free_space(self.folder, self._expected_size(), f"checkpoint {tag}")
        try:
            if rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)  # a stale partial folder from an interrupted save
                drop_universal(self.folder, tag)  # converted from the checkpoint this save replaces
                tag_dir.mkdir(parents=True)
                # The architecture, so conversion tools can rebuild the network without the Hydra config.
                metadata = {**self.metadata, "step": step, "world_size": world}
                atomic_write_text(tag_dir / "config.json", json.dumps(metadata, indent=2))
            barrier()
            # DeepSpeed's own 'latest' is written before its last barrier, while other ranks may still be
            # writing: we move the pointer ourselves once every rank is done (save_checkpoint ends in a barrier).
            engine.save_checkpoint(str(self.folder), tag=tag, client_state={**state, "step": step}, save_latest=False)
            entries = gather_objects(_checksums(tag_dir, rank, world))
        except Exception as err:
            shutil.rmtree(tag_dir, ignore_errors=True)
            raise CheckpointWriteError(self._write_failure(tag, err)) from err
        failure: OSError | None = None
        if rank == 0:
            files = {name: entry for part in entries for name, entry in part.items()}
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "world_size": world,
                "total_bytes": sum(e["bytes"] for e in files.values()),
                "files": dict(sorted(files.items())),
            }
            try:
                atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
                atomic_write_text(self.folder / "latest", tag)
            except OSError as err:  # `latest` still names the previous checkpoint
                failure = err
                shutil.rmtree(tag_dir, ignore_errors=True)
            else:
                self._prune(tag)
        if any_rank(failure is not None):  # every rank stops together, none waits in a barrier for rank 0
            cause = failure if failure is not None else OSError("rank 0 could not write its manifest")
            raise CheckpointWriteError(self._write_failure(tag, cause))
        return tag_dir

    def _expected_size(self) -> int:
        previous = [self.folder / t for t in self.tags()]
        for path in reversed(previous):
            manifest = _read_manifest(path)
            if manifest is not None:
                return int(manifest.get("total_bytes", 0))
        return self.size_estimate_bytes

    def _write_failure(self, tag: str, err: BaseException) -> str:
        free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        full = getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in text or "write failed" in text
        cause = f"the disk is full ({free / 1e6:.0f} MB free)" if full or free < 1 << 20 else text
        newest = self.latest_tag()
        keep = f"the newest complete checkpoint is {newest}" if newest else "no complete checkpoint exists yet"
        return (
            f"checkpoint {tag} could not be written to {self.folder}: {cause}; the partial folder was removed and "
            f"{keep}. Free some space (or set train.keep_last) and run the same command to resume."
        )

    def _prune(self, newest: str) -> None:
        if self.keep_last <= 0:
            return
        tags = [t for t in self.tags() if t <= newest]
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.folder / old, ignore_errors=True)
            drop_universal(self.folder, old)

    def tags(self) -> list[str]:
        """The tag folders present, oldest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if TAG_PATTERN.fullmatch(p.name) and p.is_dir())

    def latest_tag(self) -> str | None:
        latest = self.folder / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.folder / tag).is_dir() else None

    def find(self, resume: str | None) -> CheckpointRef | None:
        """The checkpoint ``resume`` names: ``auto`` (the newest that verifies, if any), ``none``, or a tag
        folder path (verified too). Every rank must call this when a process group exists."""
        if resume in ("none", "", None, False):
            return None
        if resume == "auto":
            path = self._newest_verified()
            if path is None:
                return None
        else:
            path = Path(resume)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume={resume}: no checkpoint folder there")
            problem = verify(path)
            if problem is not None:
                raise NoUsableCheckpoint(f"train.resume={resume}: {problem}")
        config = path / "config.json"
        return CheckpointRef(path.parent, path.name, json.loads(config.read_text()) if config.is_file() else {})

    def _newest_verified(self) -> Path | None:
        latest = self.latest_tag()
        candidates = [t for t in self.tags() if latest is None or t <= latest]
        if not any(_read_manifest(self.folder / t) is not None for t in candidates):
            # Checkpoints written before manifests existed: trust ``latest`` as earlier versions did.
            if latest is not None:
                self.log(f"[adamae] resume: {latest} has no {MANIFEST} (an older checkpoint): not verified")
            return self.folder / latest if latest is not None else None
        for tag in reversed(candidates):
            problem = verify(self.folder / tag)
            if problem is None:
                return self.folder / tag
            self.log(f"[adamae] resume: skipping {tag}: {problem}")
        raise NoUsableCheckpoint(
            f"train.resume=auto: no checkpoint in {self.folder} verifies (see the lines above); "
            "use train.resume=none to start over or train.resume=FOLDER for a specific one"
        )

    def load(self, engine: TrainingEngine, ref: CheckpointRef) -> dict[str, Any]:
        """Load ``ref`` into the engine (model, optimizer, scheduler); returns the saved client state."""
        refuse_unsafe_pickles(ref.path)
        load_path, client_state = engine.load_checkpoint(str(ref.folder), tag=ref.tag)
        if load_path is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load checkpoint {ref.path}")
        if ref.universal:
            # A universal checkpoint carries no client state: take it from the source checkpoint.
            client_state = _read_client_state(ref.folder / ref.tag[: -len(UNIVERSAL_SUFFIX)])
        return client_state

    def set_aside(self, first_bad_step: int) -> str | None:
        """After a divergence: rename every checkpoint from ``first_bad_step`` on to ``TAG.diverged`` (kept, never
        used by ``resume=auto``) and point ``latest`` at the newest one before it. Returns that tag (or None).
        Rank 0 only."""
        keep = [t for t in self.tags() if t < tag_for(first_bad_step)]
        for tag in self.tags():
            if tag >= tag_for(first_bad_step):
                target = self.folder / f"{tag}{DIVERGED_SUFFIX}"
                shutil.rmtree(target, ignore_errors=True)
                os.replace(self.folder / tag, target)
                drop_universal(self.folder, tag)
        if keep:
            atomic_write_text(self.folder / "latest", keep[-1])
            return keep[-1]
        (self.folder / "latest").unlink(missing_ok=True)
        return None


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "adamae-checkpoint-manifest-v1"
DIVERGED_SUFFIX = ".diverged"


def verify(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` is not usable (missing manifest, a missing, resized or changed file),
    or ``None`` when every file matches its manifest entry. With a process group, each rank hashes a share."""
    manifest = _read_manifest(tag_dir)
    if manifest is None:
        return f"no readable {MANIFEST} (the save did not complete)"
    files = manifest.get("files", {})
    rank, world = rank_and_world()
    problems: list[str] = []
    for index, (name, entry) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif index % world == rank and _sha256(path) != entry["sha256"]:
            problems.append(f"{name} does not match its checksum (damaged)")
    found = sorted({p for part in gather_objects(problems) for p in part})
    return "; ".join(found[:3]) if found else None


def _read_manifest(tag_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _checksums(tag_dir: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of this rank's share of the files under ``tag_dir`` (the manifest excluded)."""
    names = sorted(
        str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    names = [n for n in names if n != MANIFEST]
    return {
        name: {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        for name in names[rank::world]
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _print_rank0(line: str) -> None:
    if rank_and_world()[0] == 0:
        print(line, file=sys.stderr, flush=True)


UNIVERSAL_SUFFIX = "_universal"
# In a universal folder: the sha256 of the source checkpoint's manifest.json it was converted from.
UNIVERSAL_SOURCE = "source_manifest.sha256"
# DeepSpeed's pointer to the newest universal folder (ds_to_universal writes it; we pass tags explicitly).
LATEST_UNIVERSAL = "latest_universal"
TAG_PATTERN = re.compile(r"step_\d{8}")


@dataclass(frozen=True)
class CheckpointRef:
    folder: Path
    tag: str
    # Its config.json as read when it was found (empty when it has none): what the run that wrote it recorded.
    recorded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def path(self) -> Path:
        return self.folder / self.tag

    @property
    def world_size(self) -> int | None:
        """The world size the checkpoint was written on, as recorded (None when it records none)."""
        return self.recorded.get("world_size")

    @property
    def saved_step(self) -> int | None:
        """The step the checkpoint records: a tag folder may have been renamed (best/, step_N.diverged/)."""
        step = self.recorded.get("step")
        return step if isinstance(step, int) else None

    @property
    def universal(self) -> bool:
        return self.tag.endswith(UNIVERSAL_SUFFIX)

    @property
    def step(self) -> int:
        if self.saved_step is not None:
            return self.saved_step
        match = re.fullmatch(r"step_(\d+)", self.tag.removesuffix(UNIVERSAL_SUFFIX))
        if match is None:
            raise NoUsableCheckpoint(
                f"train.resume={self.path}: its config.json records no step and the folder is not named "
                "step_NNNNNNNN; rename it so, or start over with train.resume=none"
            )
        return int(match.group(1))


def drop_universal(folder: Path, tag: str) -> None:
    """Remove ``tag``'s universal form (its source is being replaced or set aside) and a ``latest_universal``
    that would then name a missing folder."""
    shutil.rmtree(folder / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    latest = folder / LATEST_UNIVERSAL
    try:
        named = latest.read_text().strip()
    except OSError:
        return
    if not named or not (folder / named).is_dir():
        latest.unlink(missing_ok=True)


def _manifest_digest(tag_dir: Path) -> str:
    """sha256 of ``tag_dir``'s manifest.json (``none`` without one): which save of the tag this is."""
    manifest = tag_dir / MANIFEST
    return _sha256(manifest) if manifest.is_file() else "none"


def to_universal(ref: CheckpointRef, is_rank0: bool) -> CheckpointRef:
    """DeepSpeed's universal (world-size independent) form of ``ref``, converted by rank 0 with DeepSpeed's
    own ``ds_to_universal`` into ``TAG_universal`` (built under a temporary name, then renamed, so a
    half-converted folder is never used). The folder records the source's manifest digest and is converted
    again when the source has changed since. Every rank must call this; when the conversion fails, every rank
    raises ``NoUsableCheckpoint`` with rank 0's reason (none waits for rank 0 in a barrier)."""
    target = ref.folder / f"{ref.tag}{UNIVERSAL_SUFFIX}"
    refuse_unsafe_pickles(ref.path)  # on every rank, so all stop together: the converter un-pickles in full
    source = _manifest_digest(ref.path)
    recorded = target / UNIVERSAL_SOURCE
    if is_rank0 and target.is_dir() and (not recorded.is_file() or recorded.read_text().strip() != source):
        shutil.rmtree(target)
    failure = _convert_to_universal(ref, target, source) if is_rank0 and not target.is_dir() else None
    reasons = [reason for reason in gather_objects(failure) if reason]
    if reasons:
        raise NoUsableCheckpoint(reasons[0])
    return dataclasses.replace(ref, tag=target.name)


def _convert_to_universal(ref: CheckpointRef, target: Path, source: str) -> str | None:
    """Run DeepSpeed's ``ds_to_universal`` on ``ref`` into ``target``; the reason it failed, or None."""
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
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"train.resume: converting {ref.path} to a universal checkpoint for another world size failed: {last}"
    atomic_write_text(tmp / UNIVERSAL_SOURCE, source)
    os.replace(tmp, target)
    atomic_write_text(ref.folder / LATEST_UNIVERSAL, target.name)  # the converter wrote the temporary name
    return None


def refuse_unsafe_pickles(tag_dir: Path) -> None:
    """Raise ``NoUsableCheckpoint`` naming the file and the global when a ``.pt`` file under ``tag_dir`` pickles
    anything besides tensors, plain containers and DeepSpeed's few state classes. DeepSpeed un-pickles its files
    in full (``weights_only=False``), which would run such code: this scan reads the pickles without running them."""
    from ..base.errors import ConvertError
    from ..base.weights import DEEPSPEED_GLOBALS, refuse_unsafe_pickle

    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            refuse_unsafe_pickle(path, DEEPSPEED_GLOBALS)
        except ConvertError as err:
            raise NoUsableCheckpoint(f"train.resume: {err}") from err


def _read_client_state(tag_dir: Path) -> dict[str, Any]:
    from ..base.weights import DEEPSPEED_GLOBALS, safe_torch_load

    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"train.resume: no model_states file in {tag_dir}")
    # DeepSpeed stores it as a pickle: load it with the same allowlist the conversion tools use.
    state = safe_torch_load(files[0], DEEPSPEED_GLOBALS)
    keys = ("step", "data", "nonfinite_steps_skipped", "ema")  # ema: fine-tuning's model EMA
    return {k: state[k] for k in keys if k in state}
