"""The four annotation formats → records, and errors that name the file and line."""

import json

import pytest

from adamae_scale.data.annotations import (
    AnnotationError,
    Record,
    build_label_map,
    detect_format,
    index_stems,
    label_index,
    read_annotations,
    resolve,
    scan_folder,
)


def test_space_separated_lists_two_and_three_columns(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("# comment\nvideos/a.mp4 3\n\nvideos/b.mp4 120 7\n")
    records = read_annotations(f)
    assert [(r.path, r.label, r.line) for r in records] == [("videos/a.mp4", 3, 2), ("videos/b.mp4", 7, 4)]
    f.write_text("videos/a.mp4 3\nvideos/b.mp4\n")
    with pytest.raises(AnnotationError, match=r"train.txt:2: expected 'path label'.*'videos/b.mp4'"):
        read_annotations(f)


def test_csv_with_header_and_named_labels(tmp_path):
    f = tmp_path / "list.csv"
    f.write_text("path,label\na.mp4,cat\nb.mp4,dog\nc.mp4,cat\n")
    assert detect_format(f) == "csv"
    records = read_annotations(f)
    labels = build_label_map(records)
    assert labels == {"cat": 0, "dog": 1}
    assert [label_index(r.label, labels) for r in records] == [0, 1, 0]
    f.write_text("path,label\na.mp4,cat\nb.mp4,dog,extra\n")
    with pytest.raises(AnnotationError, match=r"list.csv:3: expected 'path,label'"):
        read_annotations(f)


def test_kinetics_csv_names_files_the_downloader_way(tmp_path):
    f = tmp_path / "k400.csv"
    f.write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,--Ntv_b3mEQ,12,22,train\nzumba,a_b-c,0,10,train\n"
    )
    assert detect_format(f) == "kinetics"
    records = read_annotations(f)
    assert records[0] == Record("--Ntv_b3mEQ_000012_000022", "abseiling", 2, "--Ntv_b3mEQ")
    root = tmp_path / "videos"
    (root / "train" / "abseiling").mkdir(parents=True)
    (root / "train" / "abseiling" / "--Ntv_b3mEQ_000012_000022.mp4").write_bytes(b"x")
    (root / "a_b-c.webm").write_bytes(b"x")  # named by the bare id
    stems = index_stems(root)
    assert resolve(records[0], root, stems).name == "--Ntv_b3mEQ_000012_000022.mp4"
    assert resolve(records[1], root, stems).name == "a_b-c.webm"
    f.write_text("label,youtube_id,time_start,time_end,split\nabseiling,xyz,twelve,22,train\n")
    with pytest.raises(AnnotationError, match=r"k400.csv:2: time_start/time_end must be numbers"):
        read_annotations(f)
    f.write_text("label,id,start\nabseiling,xyz,1\n")
    with pytest.raises(AnnotationError, match=r"k400.csv:1: Kinetics header lacks"):
        read_annotations(f, "kinetics")


def test_ssv2_json_templates_become_classes(tmp_path):
    f = tmp_path / "something-something-v2-train.json"
    items = [
        {
            "id": "78687",
            "label": "holding potato next to vicks vaporub bottle",
            "template": "Holding [something] next to [something]",
            "placeholders": ["potato", "bottle"],
        },
        {"id": "42326", "label": "putting a pen on a table", "template": "Putting [something] on a surface"},
        {"id": "100", "label": "x"},
    ]
    f.write_text(json.dumps(items))
    records = read_annotations(f)
    assert [(r.path, r.label) for r in records] == [
        ("78687", "Holding something next to something"),
        ("42326", "Putting something on a surface"),
        ("100", None),
    ]
    given = {"Holding something next to something": 5, "Putting something on a surface": 9}
    assert build_label_map(records, given) == given
    with pytest.raises(AnnotationError, match="--label-map has no entry"):
        build_label_map(records, {"Holding something next to something": 5})
    f.write_text('[{"id": "1"},\n {"template": "x"}]')
    with pytest.raises(AnnotationError, match=r"item 2: expected an object with an 'id'"):
        read_annotations(f)
    f.write_text('[{"id": "1"},\n {"id": }]')
    with pytest.raises(AnnotationError, match=r"json:2: not valid JSON"):
        read_annotations(f)


def test_folder_scan_labels_by_subfolder(tmp_path):
    for name in ("cats/a.mp4", "cats/b.MKV", "dogs/c.webm", "top.mp4", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    records = scan_folder(tmp_path)
    assert [(r.path, r.label) for r in records] == [
        ("cats/a.mp4", "cats"),
        ("cats/b.MKV", "cats"),
        ("dogs/c.webm", "dogs"),
        ("top.mp4", None),
    ]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        read_annotations(tmp_path / "nope.txt")
    (tmp_path / "a.txt").write_text("a.mp4 1\n")
    with pytest.raises(AnnotationError, match="--format 'tsv'"):
        read_annotations(tmp_path / "a.txt", "tsv")
