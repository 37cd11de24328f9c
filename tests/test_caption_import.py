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
    m = read_manifest(tmp_path / "o")
    assert m["stages"]["captions"]["items_computed"] == 6 and m["stages"]["captions"]["model_loaded"]  # the one without
    # the stored warning names the file the user gave, not its folder (publish hides only whole-path values)
    assert m["warnings"] == ["1 of 6 images have no caption in caps.jsonl (--captions-from), e.g. "
                             "n01440764/n01440764_0.png: the captioner describes them"]
    assert str(tmp_path) not in json.dumps(m["warnings"])


def test_a_malformed_caption_file_is_a_one_line_error(vlcp, folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "a.png"}\n')
    r = vlcp("distill", "--data", folder, "--tiny", "--ipc", "1", "--captions-from", bad, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "bad.jsonl, line 1" in r.output and "Traceback" not in r.output


def test_clean_captions_feed_algorithm_2(vlcp, folder, tmp_path):
    caps = _jsonl(tmp_path / "caps.jsonl", _reference_rows())
    # the paper's reading: with 3 captions that share every word, the reference's N (beta 0.2) would take them all
    base = ["distill", "--data", folder, "--tiny", "--ipc", "1", "--until", "text_prototypes", "--captions-from", caps,
            "--text-prototypes", "paper"]
    vlcp(*base, "--out", tmp_path / "a")
    vlcp(*base, "--no-clean-captions", "--out", tmp_path / "b")
    a = json.loads((tmp_path / "a" / "prototypes.json").read_text())["classes"]["n01440764"]["clusters"][0]
    b = json.loads((tmp_path / "b" / "prototypes.json").read_text())["classes"]["n01440764"]["clusters"][0]
    assert '"' not in a["caption"] and "'s" not in a["caption"] and a["caption"].startswith("a n01440764 fish fin")
    assert b["caption"].startswith('a "n01440764" fish\'s fin')


def test_reference_captions_give_the_reference_text_prototypes(vlcp, folder, tmp_path):
    """The authors' captions and the default mode give the reference code's picks (gen_prototype.py), hand-derived.

    One cluster per class (IPC 1, no LOF), beta 0.7 over 3 captions: N = words in >= 2.1 captions = {fish}.
    Class n01440764 ("tench, Tinca tinca"): R_w = Counter of the remaining non-stop-word tokens:
    red 2, fins 1, green 1, tail 1, covered 1, shredded 1, scales 1 (every count distinct from the best).
      "a fish with red fins"       red 2 + fins 1                                     = 3
      "a green fish, red tail"     green 1 + red 2 + tail 1                           = 4
      "covered shredded fish scales"  covered 1 + shredded 1 + scales 1 + red 2 (inside "shredded") = 5  <- reference
    The paper's reading matches whole words only: 3, 4, 3 -> "a green fish, red tail".
    Class n02102040: every word is a stop word or in N, so every caption scores 0: the reference's prompt is
    the empty string; the paper's reading falls back to the closest member's caption.
    """
    rows = {"n01440764": ["a fish with red fins", "a green fish, red tail", "covered shredded fish scales"],
            "n02102040": ["a fish", "the fish", "fish"]}
    caps = _jsonl(tmp_path / "caps.jsonl", [(f"{c}/{c}MM{j}.png", t) for c, ts in rows.items() for j, t in enumerate(ts)])
    base = ["distill", "--data", folder, "--tiny", "--ipc", "1", "--contamination", "0", "--beta", "0.7",
            "--until", "prompts", "--captions-from", caps]
    assert vlcp(*base, "--out", tmp_path / "ref").exit_code == 0
    assert vlcp(*base, "--text-prototypes", "paper", "--out", tmp_path / "paper").exit_code == 0
    ref, paper = (json.loads((tmp_path / o / "prototypes.json").read_text()) for o in ("ref", "paper"))
    assert read_manifest(tmp_path / "ref")["parameters"]["text_prototypes"] == "reference"
    assert ref["mode"] == "reference" and paper["mode"] == "paper"
    tench, dog = (ref["classes"][c]["clusters"][0] for c in rows)
    assert tench["caption"] == "covered shredded fish scales" and tench["score"] == 5
    assert tench["representative_words"] == {"red": 2, "fins": 1, "green": 1, "tail": 1, "covered": 1,
                                             "shredded": 1, "scales": 1}
    assert dog["caption"] == "" and dog["fallback"] and dog["member"] is None and dog["prompt"] == ""
    assert paper["classes"]["n01440764"]["clusters"][0]["caption"] == "a green fish, red tail"
    assert paper["classes"]["n02102040"]["clusters"][0]["caption"] in rows["n02102040"]
