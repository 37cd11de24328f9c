"""Caption matching on synthetic images (vlcp's reading of the multi-modal paper's abstract): the score, the
--min-caption-match criterion, its reruns and the CLIP caches it shares with post-sampling."""
import numpy as np
import pytest

from tests.conftest import read_manifest
from vlcp.method import refine
from vlcp.pipeline.stages import masks as ms
from vlcp.pipeline.stages.caption_match import cosines

ARGS = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "8", "--ipc", "1",
        "--steps", "2", "--no-finetune", "--refine", "--detector-epochs", "1", "--refine-candidates", "2",
        "--refine-beta", "1.0"]


def _computed(m: dict) -> list[str]:
    return [s for s, r in m["stages"].items() if s != "output" and r["items_computed"] > 0]


def test_cosines_pair_each_image_with_its_own_text():
    s = np.sqrt(0.5)
    img = np.array([[1.0, 0.0], [s, s], [0.0, 1.0]])
    txt = np.array([[s, s], [s, s], [1.0, 0.0]])
    np.testing.assert_allclose(cosines(img, txt), [s, 1.0, 0.0])


def test_a_low_caption_match_makes_an_image_defective_and_a_candidate_invalid():
    good = {"pred": 0, "probs": [0.9, 0.1], "feature": [1.0, 0.0]}
    scores = ms.as_judged([good], ms.below([0.12], 0.2))  # the detector is sure, the caption does not match
    cands = ms.as_judged([dict(good, probs=[0.95, 0.05]), dict(good, probs=[0.7, 0.3])], ms.below([0.1, 0.3], 0.2))
    sel = refine.select(["a", "b"], [0], scores, {0: cands}, 0.5, 2)
    assert sel["per_class"]["a"]["defective"] == 1
    assert sel["replacements"][0]["candidate"] == 1 and sel["replacements"][0]["pool"] == [1]


@pytest.mark.e2e
def test_min_caption_match_end_to_end_reruns_and_shares_clip_with_post_sampling(vlcp, tmp_path):
    r = vlcp(*ARGS, "--min-caption-match", "1.0", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    cm = m["caption_match"]
    assert cm["method"].startswith("vlcp's reading") and cm["clip"] == m["models"]["clip"]["identity"]
    for f in ("0", "1"):
        c = cm["per_class"][f]
        assert -1 <= c["mean_prompt_match"] < 1 and -1 <= c["mean_class_match"] <= 1 and c["below"] == 1
        assert m["refinement"]["per_class"][f]["defective"] == 1  # every image is under 1.0
    s = m["stages"]
    assert s["caption_match"]["model_loaded"] and s["candidate_caption_match"]["items_computed"] >= 4

    r = vlcp(*ARGS, "--min-caption-match", "0.05", "--out", tmp_path / "b")  # a new S: no embedding recomputed
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert _computed(m) == ["refinement"] and not m["stages"]["caption_match"]["model_loaded"]

    # post-sampling embeds the same synthetic images with the same CLIP: found in the shared cache
    r = vlcp(*ARGS, "--post-sample", "sas", "--pool-multiplier", "1", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    s = read_manifest(tmp_path / "c")["stages"]
    assert s["clip_image"]["items_computed"] == 0 and s["clip_image"]["items_cached"] == 2


@pytest.mark.parametrize("args, hint", [
    (["--min-caption-match", "0"], "--min-caption-match"),
    (["--min-caption-match", "1.5"], "--min-caption-match"),
])
def test_bad_caption_match_thresholds_are_usage_errors(vlcp, tmp_path, args, hint):
    r = vlcp(*ARGS, *args, "--out", tmp_path / "o")
    assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output
    no_refine = [a for a in ARGS if a != "--refine"]
    r = vlcp(*no_refine, "--min-caption-match", "0.2", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "add --refine" in r.output
