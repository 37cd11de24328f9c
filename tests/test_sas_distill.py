"""`vlcp distill --post-sample sas`: the pool, CLIP and the selection as stages of the table."""
import json

import numpy as np
from PIL import Image

from tests.conftest import read_manifest

ARGS = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "8", "--ipc", "2",
        "--steps", "2", "--no-finetune", "--post-sample", "sas", "--pool-multiplier", "3", "--image-size", "32"]


def test_sas_keeps_ipc_pool_images_and_reruns_only_what_changed(vlcp, tmp_path):
    r = vlcp(*ARGS, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    s = m["stages"]
    assert s["pool"]["items_computed"] == 8 and s["clip_image"]["items_computed"] == 12  # 4 x (3 - 1); 4 x 3
    ps = m["post_sampling"]
    assert ps["method"].startswith("vlcp's formulation of SAS") and "not the authors' method" in ps["method"]
    assert len(ps["pool"]) == 12 and sum(r["kept"] for r in ps["pool"]) == 4
    assert sorted(ps["images"]) == ["0/0000.png", "0/0001.png", "1/0000.png", "1/0001.png"]
    kept = [i for i, r in enumerate(ps["pool"]) if r["kept"]]
    assert sorted(ps["pool"][i]["class"] for i in kept) == [0, 0, 1, 1]  # IPC 2 of each class's 6
    assert len(list((tmp_path / "a").rglob("0*.png"))) == 4
    r = vlcp(*ARGS, "--sas-lambda", "0.1", "--sas-alpha", "0.9", "--out", tmp_path / "b")
    s = read_manifest(tmp_path / "b")["stages"]
    assert [n for n, x in s.items() if x["items_computed"] and n != "output"] == ["post_sampling"]
    assert not s["clip_image"]["model_loaded"] and not s["pool"]["model_loaded"]
    r = vlcp(*ARGS[:-4], "--pool-multiplier", "4", "--image-size", "32", "--out", tmp_path / "c")
    s = read_manifest(tmp_path / "c")["stages"]
    assert s["pool"]["items_computed"] == 4 and s["pool"]["items_cached"] == 8  # only candidate 3 of each
    assert s["clip_image"]["items_computed"] == 4


def test_select_random_is_the_seeded_control(vlcp, tmp_path):
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert vlcp(*ARGS, "--select", "random", "--seed", seed, "--out", tmp_path / out).exit_code == 0
    picks = {o: json.loads((tmp_path / o / "manifest.json").read_text())["post_sampling"]["images"] for o in "abc"}
    assert picks["a"] == picks["b"]
    pix = {o: np.asarray(Image.open(tmp_path / o / "0" / "0000.png")) for o in "ab"}
    assert (pix["a"] == pix["b"]).all()


def test_pool_multiplier_one_warns_and_keeps_the_synthetic_set(vlcp, tmp_path):
    r = vlcp(*ARGS[:-4], "--pool-multiplier", "1", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "--pool-multiplier 1" in r.output
    m = read_manifest(tmp_path / "o")
    assert m["stages"]["pool"]["items_computed"] == 0 and len(m["post_sampling"]["images"]) == 4


def test_bad_sas_parameters_are_usage_errors(vlcp, tmp_path):
    for args, hint in ((["--sas-keep", "0"], "--sas-keep"), (["--clip-prompt", "a photo"], "--clip-prompt"),
                       (["--sas-lambda", "2"], "--sas-lambda")):
        r = vlcp(*ARGS, *args, "--out", tmp_path / "o")
        assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output
