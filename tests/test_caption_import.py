"""--captions-from (the authors' captions in the reference .jsonl) and `vlcp captions export`."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_manifest
from vlcp.models import loading as models

CLASSES = ["n01440764", "n02102040"]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{c}_{j}.png")
    return root


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    return path


def _reference_rows():  # the reference renaming script writes '_' as 'MM'
    return [(f"{c}/{c}MM{j}.png", f"a \"{c}\" fish's fin number {j}") for c in CLASSES for j in range(3)]


def test_imported_captions_never_load_the_captioner_and_round_trip(vlcp, folder, tmp_path, monkeypatch):
    caps = _jsonl(tmp_path / "caps.jsonl", _reference_rows())

    def no_captioner(*a, **k):
        raise AssertionError("the captioner was loaded")
    monkeypatch.setattr(models, "load_captioner", no_captioner)
    args = ["distill", "--data", folder, "--tiny", "--ipc", "1", "--until", "captions", "--captions-from", caps]
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    assert m["stages"]["captions"]["items_computed"] == 6 and not m["stages"]["captions"]["model_loaded"]
    assert m["imported_captions"]["matched"] == 6 and m["imported_captions"]["captioned"] == 0
    r = vlcp("captions", "export", "--data", folder, "--tiny", "--out", tmp_path / "none.jsonl")
    assert r.exit_code == 1 and "no cached captions" in r.output  # the captioner described nothing
    r = vlcp("captions", "export", "--data", folder, "--tiny", "--captions-from", caps, "--out",
             tmp_path / "export.jsonl")
    assert r.exit_code == 0, r.output
    got = [json.loads(ln) for ln in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert got == [{"file_name": f.replace("MM", "_"), "text": t} for f, t in _reference_rows()]
    r = vlcp(*args, "--out", tmp_path / "o2")  # a rerun with the same file is cached
    assert read_manifest(tmp_path / "o2")["stages"]["captions"]["items_computed"] == 0


def test_images_without_a_caption(vlcp, folder, tmp_path):
    caps = _jsonl(tmp_path / "caps.jsonl", _reference_rows()[1:])
    args = ["distill", "--data", folder, "--tiny", "--ipc", "1", "--until", "captions", "--captions-from", caps]
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "1 of 6 images have no caption" in r.output
    assert "n01440764/n01440764_0.png" in r.output and "--missing-captions caption" in r.output
    r = vlcp(*args, "--missing-captions", "caption", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    s = read_manifest(tmp_path / "o")["stages"]["captions"]
    assert s["items_computed"] == 6 and s["model_loaded"]  # the captioner described the one without


def test_a_malformed_caption_file_is_a_one_line_error(vlcp, folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "a.png"}\n')
    r = vlcp("distill", "--data", folder, "--tiny", "--ipc", "1", "--captions-from", bad, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "bad.jsonl, line 1" in r.output and "Traceback" not in r.output


def test_clean_captions_feed_algorithm_2(vlcp, folder, tmp_path):
    caps = _jsonl(tmp_path / "caps.jsonl", _reference_rows())
    base = ["distill", "--data", folder, "--tiny", "--ipc", "1", "--until", "text_prototypes", "--captions-from", caps]
    vlcp(*base, "--out", tmp_path / "a")
    vlcp(*base, "--no-clean-captions", "--out", tmp_path / "b")
    a = json.loads((tmp_path / "a" / "prototypes.json").read_text())["classes"]["n01440764"]["clusters"][0]
    b = json.loads((tmp_path / "b" / "prototypes.json").read_text())["classes"]["n01440764"]["clusters"][0]
    assert '"' not in a["caption"] and "'s" not in a["caption"] and a["caption"].startswith("a n01440764 fish fin")
    assert b["caption"].startswith('a "n01440764" fish\'s fin')
