"""Where videos come from: a folder, or an annotation file in one of the common formats → records.

Formats (``--format``, or ``auto`` by extension and header):

- ``list``: ``path label`` per line, space-separated, as in VideoMAE/AdaMAE lists; the three-column
  pre-training lists ``path num_frames label`` are accepted too. ``#`` starts a comment line.
- ``csv``: ``path,label`` (a header row naming ``path`` is skipped).
- ``kinetics``: the official CSV ``label,youtube_id,time_start,time_end,split``; the file is found as
  ``{youtube_id}_{start:06d}_{end:06d}.*`` (the downloaders' naming) or ``{youtube_id}.*`` under the root.
- ``ssv2``: the Something-Something v2 JSON list of ``{"id", "template", "label", ...}``; the file is
  ``{id}.webm`` (or any video extension) under the root, the class is the template without brackets.

Labels become integers: integer labels stay as they are, names are numbered in sorted order (or by a
``--label-map`` JSON ``{name: index}``). A video without a label gets -1.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .video import VIDEO_EXTENSIONS

FORMATS = ("auto", "list", "csv", "kinetics", "ssv2")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class Record:
    """One input video: where it is, what it is called in the output, its label."""

    path: str  # absolute or relative to the root; resolved by ``resolve``
    label: str | int | None
    line: int = 0  # 1-based line (or list index) in the annotation file; 0 for folder scans
    alt_stem: str | None = None  # another file stem to look for (Kinetics: the bare youtube id)


def scan_folder(folder: Path, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[Record]:
    """Every video under ``folder`` (recursive, sorted). Videos in a sub-folder are labelled with the
    sub-folder's name (``class/video.mp4``, the Kinetics layout); videos at the top level get no label."""
    exts = {e.lower() for e in extensions}
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    return records_of([str(path.relative_to(folder)) for path in paths])


def records_of(relative_paths: Iterable[str]) -> list[Record]:
    """The records of a folder's videos given by their paths inside it, labelled by their first sub-folder."""
    records = []
    for text in relative_paths:
        rel = Path(text)
        records.append(Record(str(rel), rel.parts[0] if len(rel.parts) > 1 else None))
    return records


def detect_format(path: Path, text: str | None = None) -> str:
    """The format of an annotation file, from its name and (CSV) header row; ``text`` is its content when it
    was read already (a remote file)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "ssv2"
    if suffix == ".csv":
        if text is None:
            with path.open(newline="") as f:
                header = [c.strip().lower() for c in next(csv.reader(f), [])]
        else:
            header = [c.strip().lower() for c in next(csv.reader(io.StringIO(text)), [])]
        return "kinetics" if "youtube_id" in header else "csv"
    return "list"


def read_annotations(path: Path, fmt: str = "auto") -> list[Record]:
    """The records of an annotation file; ``AnnotationError`` on the first malformed line."""
    if fmt not in FORMATS:
        raise AnnotationError(f"--format {fmt!r}: expected one of {FORMATS}")
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    return parse_annotations(str(path), path.read_text(), fmt)


def parse_annotations(name: str, text: str, fmt: str = "auto") -> list[Record]:
    """The records of the annotation file ``name`` (a path or URL, named in errors) whose content is ``text``."""
    if fmt not in FORMATS:
        raise AnnotationError(f"--format {fmt!r}: expected one of {FORMATS}")
    fmt = detect_format(Path(name), text) if fmt == "auto" else fmt
    reader = {"list": _read_list, "csv": _read_csv, "kinetics": _read_kinetics, "ssv2": _read_ssv2}[fmt]
    records = reader(name, text)
    if not records:
        raise AnnotationError(f"{name}: no videos listed (read as format {fmt!r})")
    return records


def _label(token: str) -> str | int:
    try:
        return int(token)
    except ValueError:
        return token


def _read_list(path: str, text: str) -> list[Record]:
    records = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 2:
            records.append(Record(parts[0], _label(parts[1]), number))
        elif len(parts) == 3 and parts[1].lstrip("-").isdigit():
            records.append(Record(parts[0], _label(parts[2]), number))
        else:
            raise AnnotationError(f"{path}:{number}: expected 'path label' (or 'path num_frames label'), got {line!r}")
    return records


def _read_csv(path: str, text: str) -> list[Record]:
    records = []
    with io.StringIO(text, newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if number == 1 and cells[0].lower() in ("path", "video", "filename", "file"):
                continue  # header
            if len(cells) != 2 or not cells[0]:
                raise AnnotationError(f"{path}:{number}: expected 'path,label', got {','.join(row)!r}")
            records.append(Record(cells[0], _label(cells[1]) if cells[1] else None, number))
    return records


def _read_kinetics(path: str, text: str) -> list[Record]:
    records = []
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = [c.strip().lower() for c in next(reader, [])]
        missing = [c for c in KINETICS_COLUMNS if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}:1: Kinetics header lacks {missing}: expected "
                f"'label,youtube_id,time_start,time_end,split', got {','.join(header)!r}"
            )
        col = {name: header.index(name) for name in KINETICS_COLUMNS}
        for number, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise AnnotationError(
                    f"{path}:{number}: expected {len(header)} columns "
                    f"({','.join(header)}), got {len(row)}: {','.join(row)!r}"
                )
            try:
                start, end = int(float(row[col["time_start"]])), int(float(row[col["time_end"]]))
            except ValueError:
                raise AnnotationError(
                    f"{path}:{number}: time_start/time_end must be numbers, got "
                    f"{row[col['time_start']]!r}, {row[col['time_end']]!r}"
                ) from None
            youtube_id = row[col["youtube_id"]].strip()
            if not youtube_id:
                raise AnnotationError(f"{path}:{number}: empty youtube_id")
            label = row[col["label"]].strip()
            records.append(Record(f"{youtube_id}_{start:06d}_{end:06d}", label or None, number, youtube_id))
    return records


def _read_ssv2(path: str, text: str) -> list[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{'id', 'template', ...}} objects")
    records = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict) or "id" not in item:
            raise AnnotationError(f"{path}: item {index}: expected an object with an 'id', got {str(item)[:80]!r}")
        template = item.get("template")
        label = template.replace("[", "").replace("]", "") if isinstance(template, str) else None
        records.append(Record(str(item["id"]), label, index))
    return records


def build_label_map(records: Iterable[Record], given: dict[str, int] | None = None) -> dict[str, int]:
    """Label name → index. Integer labels need no map (an empty map is returned when all are integers)."""
    names = sorted({r.label for r in records if isinstance(r.label, str)})
    if given is not None:
        unknown = [n for n in names if n not in given]
        if unknown:
            raise AnnotationError(f"--label-map has no entry for {len(unknown)} labels, e.g. {unknown[:3]}")
        return dict(given)
    return {name: index for index, name in enumerate(names)}


def label_index(label: str | int | None, label_map: dict[str, int]) -> int:
    if label is None:
        return -1
    return label if isinstance(label, int) else label_map[label]


def resolve(record: Record, root: Path, stem_index: dict[str, Path] | None = None) -> Path | None:
    """The file of a record: the path itself, or (Kinetics/SSv2 ids, given without extension) a video
    file with that stem. ``None`` when nothing matches."""
    path = Path(record.path)
    path = path if path.is_absolute() else root / path
    if path.suffix.lower() in VIDEO_EXTENSIONS or path.exists():
        return path
    if stem_index is not None:
        return stem_index.get(Path(record.path).name) or stem_index.get(record.alt_stem or "")
    return None


def index_stems(root: Path) -> dict[str, Path]:
    """Video files under ``root`` by file stem (for formats that name videos by id)."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            index.setdefault(path.stem, path)
    return index


def resolve_url(record: Record, root: str, stem_index: dict[str, str] | None = None) -> str | None:
    """``resolve`` for videos in object storage: ``root`` is a URL, ``stem_index`` maps stems to URLs."""
    if "://" in record.path:
        return record.path
    url = root.rstrip("/") + "/" + record.path
    if Path(record.path).suffix.lower() in VIDEO_EXTENSIONS or stem_index is None:
        return url
    return stem_index.get(Path(record.path).name) or stem_index.get(record.alt_stem or "")
