"""The reference's caption files: read (MM names undone), matched to images, written back."""
import json

import pytest

from vlcp.data.caption_files import (
    CaptionFileError,
    match_captions,
    read_reference_jsonl,
    undo_rename,
    write_jsonl,
)

# as llava_result_sum.py writes them: "_" of the file name replaced by "MM", quotes and 's already removed
JSONL = """{"file_name": "n01440764/n01440764MM10026.JPEG", "text": "A tench held by a man, green and gold scales."}
{"file_name": "n01440764/n01440764MM10027.JPEG", "text": "A large fish lying on grass."}

{"file_name": "n03888605/ILSVRC2012MMvalMM00000293.JPEG", "text": "A red parachute over a field."}
{"file_name": "n02102040/shared.JPEG", "text": "A spaniel on a lawn."}
{"file_name": "n03000684/shared.JPEG", "text": "A chainsaw on a bench."}
"""


def test_reads_the_reference_format_and_undoes_the_rename(tmp_path):
    (tmp_path / "nette.jsonl").write_text(JSONL, encoding="utf-8")
    table = read_reference_jsonl(tmp_path / "nette.jsonl")
    assert table == {
        "n01440764/n01440764_10026.JPEG": "A tench held by a man, green and gold scales.",
        "n01440764/n01440764_10027.JPEG": "A large fish lying on grass.",
        "n03888605/ILSVRC2012_val_00000293.JPEG": "A red parachute over a field.",
        "n02102040/shared.JPEG": "A spaniel on a lawn.",
        "n03000684/shared.JPEG": "A chainsaw on a bench.",
    }
    assert undo_rename("MMdir/aMMb.png") == "MMdir/a_b.png"  # the class folder was never renamed


def test_matches_by_path_then_by_unique_file_name(tmp_path):
    (tmp_path / "nette.jsonl").write_text(JSONL, encoding="utf-8")
    table = read_reference_jsonl(tmp_path / "nette.jsonl")
    rels = ["n01440764/n01440764_10026.JPEG",  # by path
            "train/n03888605/ILSVRC2012_val_00000293.JPEG",  # other prefix: by file name
            "n01440764/n01440764MM10027.JPEG",  # a dataset renamed by the reference's rename.sh
            "n02102040/missing.JPEG",  # no caption
            "other/shared.JPEG"]  # name in two classes: ambiguous, never borrowed
    found, missing = match_captions(rels, table)
    assert found == {0: "A tench held by a man, green and gold scales.", 1: "A red parachute over a field.",
                     2: "A large fish lying on grass."}
    assert missing == ["n02102040/missing.JPEG", "other/shared.JPEG"]
    found, _ = match_captions(["n03000684/shared.JPEG"], table)  # by path it is not ambiguous
    assert found == {0: "A chainsaw on a bench."}


def test_bad_lines_are_one_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a/b.png", "text": "ok"}\n{"name": "x"}\n')
    with pytest.raises(CaptionFileError, match=r"bad.jsonl, line 2: expected"):
        read_reference_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "notjson.jsonl").write_text("not json\n")
    with pytest.raises(CaptionFileError, match="line 1"):
        read_reference_jsonl(tmp_path / "notjson.jsonl")
    with pytest.raises(CaptionFileError, match="cannot read caption file"):
        read_reference_jsonl(tmp_path / "absent.jsonl")


def test_write_jsonl_round_trips(tmp_path):
    rows = [{"file_name": "n01440764/n01440764_1.JPEG", "text": "Ein Fisch, grün"},
            {"file_name": "3/0004.png", "text": "a loop"}]
    assert write_jsonl(tmp_path / "metadata.jsonl", rows) == 2
    text = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8")
    assert text.splitlines()[0] == '{"file_name": "n01440764/n01440764_1.JPEG", "text": "Ein Fisch, grün"}'
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert read_reference_jsonl(tmp_path / "metadata.jsonl") == {r["file_name"]: r["text"] for r in rows}
    assert not [p for p in tmp_path.iterdir() if p.name != "metadata.jsonl"]  # no temporary file left
