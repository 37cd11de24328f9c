"""Detector-guided refinement: defect rule, selection on hand-made scores, seeds, end to end, reruns."""
import json

import numpy as np
import pytest

from tests.conftest import read_manifest
from vlcp.method import refine


def test_defect_rule_threshold_is_inclusive():
    assert refine.is_defective(pred=2, p_target=0.99, target=3, beta=0.9)  # wrong label
    assert refine.is_defective(pred=3, p_target=0.9, target=3, beta=0.9)  # p == beta is defective
    assert not refine.is_defective(pred=3, p_target=0.9001, target=3, beta=0.9)


E = np.eye(3)


def test_candidate_at_exactly_beta_is_not_valid():
    # candidate 0 sits exactly on beta, candidate 1 below it: neither is valid
    best, how, pool = refine.choose([1, 1], [0.9, 0.85], np.array([E[0], E[1]]), 1, 0.9, 2, [E[1]])
    assert (best, how, pool) == (0, "fallback", [0])  # no valid candidate: the most confident one alone
    best, how, pool = refine.choose([1, 1, 1], [0.9, 0.95, 0.9], np.array([E[1], E[1], E[0]]), 1, 0.9, 2, [E[1]])
    assert (best, how, pool) == (1, "valid", [1])  # only p > beta joins the pool, though 2 would be less similar


def test_select_treats_an_image_at_beta_as_defective_and_a_candidate_at_beta_as_invalid():
    img = {"pred": 0, "probs": [0.9, 0.1], "feature": E[0]}  # p == beta: defective
    good = {"pred": 0, "probs": [0.99, 0.01], "feature": E[1]}
    cands = [{"pred": 0, "probs": [0.9, 0.1], "feature": E[2]}, {"pred": 0, "probs": [0.8, 0.2], "feature": E[1]}]
    out = refine.select(["a"], [0, 0], [img, good], {0: cands}, beta=0.9, top_k=2)
    assert out["replacements"] == {0: {"candidate": 0, "how": "fallback", "pool": [0], "p_before": 0.9,
                                       "p_after": 0.9}}
    assert out["per_class"]["a"] == {"images": 2, "defective": 1, "valid": 0, "fallback": 1,
                                     "confidence_before": 0.945, "confidence_after": 0.945}


def test_valid_pool_larger_than_k_keeps_top_k_then_least_similar():
    preds, probs = [1, 1, 1, 0], [0.95, 0.99, 0.97, 0.999]  # candidate 3 predicts the wrong class
    feats = np.array([E[0], E[1], E[2], E[2]])
    normals = [E[1], E[1]]  # the accepted images look like e1
    best, how, pool = refine.choose(preds, probs, feats, 1, 0.9, 2, normals)
    assert (pool, how) == ([1, 2], "valid")  # top-2 by p among the valid
    assert best == 2  # e2 is orthogonal to the accepted set; candidate 1 (e1) is not


def test_empty_valid_pool_falls_back_to_highest_p():
    best, how, pool = refine.choose([0, 2, 1], [0.5, 0.2, 0.8], np.array(E), 1, 0.9, 2, [E[0]])
    assert (best, how, pool) == (2, "fallback", [2])  # p 0.8 <= beta: no valid candidate


def test_equal_confidence_and_similarity_go_to_the_lower_index():
    best, how, pool = refine.choose([1, 1, 1], [0.95, 0.95, 0.95], np.array([E[0], E[0], E[0]]), 1, 0.9, 2, [])
    assert (pool, best) == ([0, 1], 0)


def test_accepted_replacements_change_the_next_choice():
    # two defective images of class 0, each with two valid candidates (features e1 or e2)
    ok = {"pred": 0, "probs": [0.99, 0.01], "feature": E[0]}
    bad = {"pred": 1, "probs": [0.1, 0.9], "feature": E[2]}
    cands = [{"pred": 0, "probs": [0.95, 0.05], "feature": E[1]}, {"pred": 0, "probs": [0.96, 0.04], "feature": E[2]}]
    out = refine.select(["a", "b"], [0, 0, 0], [ok, bad, bad], {1: cands, 2: cands}, beta=0.9, top_k=2)
    first, second = out["replacements"][1], out["replacements"][2]
    assert first["candidate"] == 1  # both orthogonal to e0: the tie goes to the more confident one (e2)
    assert second["candidate"] == 0  # e2 is now accepted, so e1 is the less similar one
    st = out["per_class"]["a"]
    assert (st["images"], st["defective"], st["valid"], st["fallback"]) == (3, 2, 2, 0)


def test_default_beta_per_dataset():
    assert [refine.default_beta(d) for d in ("imagenette", "imagewoof", "cifar10", "digits")] == [0.9, 0.9, 0.7, 0.9]


def test_summed_cosine_similarity_normalises_both_sides():
    v = np.array([3.0, 4.0])  # unit vector (0.6, 0.8)
    assert refine._cos(v, []) == 0.0
    assert refine._cos(v, [np.array([0.0, 2.0]), np.array([6.0, 8.0])]) == pytest.approx(0.8 + 1.0, abs=1e-9)
    assert refine._cos(v, [np.array([10.0, 0.0])]) == pytest.approx(0.6, abs=1e-9)


def test_fallback_ties_go_to_the_lower_index():
    best, how, pool = refine.choose([0, 0, 0], [0.3, 0.5, 0.5], np.array([E[0], E[1], E[2]]), 1, 0.9, 2, [])
    assert (best, how, pool) == (1, "fallback", [1])


def test_select_skips_images_without_candidates_keeps_top_k_and_handles_empty_classes():
    bad = {"pred": 1, "probs": [0.12345, 0.87655], "feature": E[0]}
    ok = {"pred": 0, "probs": [0.99, 0.01], "feature": E[1]}
    cands = [{"pred": 0, "probs": [0.97, 0.03], "feature": E[1]},  # most confident, but like the accepted e1
             {"pred": 0, "probs": [0.95, 0.05], "feature": E[2]}]
    out = refine.select(["a", "b"], [0, 0, 0], [bad, bad, ok], {1: cands}, beta=0.9, top_k=1)
    # image 0 has no candidates (skipped, not the end of the class); image 1: top-1 keeps candidate 0 alone
    assert out["replacements"] == {1: {"candidate": 0, "how": "valid", "pool": [0], "p_before": 0.12345,
                                       "p_after": 0.97}}
    assert out["per_class"]["a"]["confidence_before"] == 0.4123  # (0.12345 * 2 + 0.99) / 3, 4 digits
    assert out["per_class"]["a"]["confidence_after"] == 0.6945  # (0.12345 + 0.97 + 0.99) / 3 = 0.69448
    assert out["per_class"]["b"] == {"images": 0, "defective": 0, "valid": 0, "fallback": 0,
                                     "confidence_before": 0.0, "confidence_after": 0.0}


def test_candidate_seeds_are_deterministic_and_distinct():
    a = [refine.candidate_seed(123, j) for j in range(20)]
    assert a == [refine.candidate_seed(123, j) for j in range(20)] and len(set(a)) == 20
    assert refine.candidate_seed(124, 0) not in a
    import hashlib  # written out by hand: 15 hex digits of SHA-256 over the canonical JSON ["candidate",123,j]

    assert a[:2] == [int(hashlib.sha256(f'["candidate",123,{j}]'.encode()).hexdigest()[:15], 16) for j in (0, 1)]


BASE = ["distill", "--data", "digits", "--tiny", "--max-per-class", "20", "--ipc", "2", "--steps", "3",
        "--no-finetune", "--refine", "--detector-epochs", "2", "--refine-candidates", "3"]


@pytest.fixture(scope="module")
def refined(tmp_path_factory, tiny_models_dir):
    import shutil

    from click.testing import CliRunner

    from vlcp.cli.main import cli

    root = tmp_path_factory.mktemp("refine")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    r = CliRunner().invoke(cli, ["--cache-dir", str(root / "cache"), *BASE, "--out", str(root / "out")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root


@pytest.mark.e2e
def test_refine_end_to_end_explains_every_replacement(refined):
    out = refined / "out"
    assert len(list(out.rglob("0*.png"))) == 20
    m = read_manifest(out)
    s, ref = m["stages"], m["refinement"]
    assert s["detector"]["items_computed"] == 1 and 0 <= ref["detector"]["accuracy"] <= 100
    defective = sum(c["defective"] for c in ref["per_class"].values())
    assert s["candidates"]["items_computed"] == 3 * defective
    assert len(ref["replacements"]) == defective
    assert sum(c["valid"] + c["fallback"] for c in ref["per_class"].values()) == defective
    for d in ref["replacements"].values():
        assert {"candidate", "how", "pool", "p_before", "p_after", "class", "cluster"} <= set(d)
    protos = json.loads((out / "prototypes.json").read_text())
    assert "confidence_before" in protos["classes"]["0"]["refinement"]
    if defective:
        assert (out / "preview_refined.png").exists()


@pytest.mark.e2e
def test_each_replaced_image_has_exactly_the_chosen_candidates_pixels(refined, vlcp, tmp_path, monkeypatch):
    """The output holds the candidate the selection chose (not the first, not the original)."""
    from PIL import Image

    from vlcp.store.cache import StageCache

    real_choose, calls = refine.choose, []

    def choose_in_turn(preds, *args):  # the tiny detector scores every candidate 0: force varied choices
        _, how, _ = real_choose(preds, *args)
        j = len(calls) % len(preds)
        calls.append(j)
        return j, how, [j]

    monkeypatch.setattr(refine, "choose", choose_in_turn)
    import shutil

    shutil.copytree(refined / "cache", tmp_path / "c")  # a private copy: the forced selection must not leak
    StageCache(tmp_path / "c").clear("refinement")  # the selection is cached: make it run (with the forced choice)
    # --image-size 32 keeps the generated size, so the PNGs must equal the cached candidates bit for bit
    r = vlcp(*BASE, "--image-size", "32", "--out", tmp_path / "o", cache=tmp_path / "c")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    reps = m["refinement"]["replacements"]
    assert len(reps) == len(calls) > 0 and {d["candidate"] for d in reps.values()} == {0, 1, 2}
    assert m["stages"]["candidates"]["items_computed"] == 0  # all cached by the fixture's run
    cache = StageCache(tmp_path / "c")
    cands = {}
    for k in cache.index.iterkeys():
        if k.startswith("candidates/"):
            e = cache.get("candidates", k.split("/", 1)[1])
            cands[(e.meta["of"], e.meta["candidate"])] = e.tensors["image"]
    for i, d in reps.items():
        png = np.asarray(Image.open(tmp_path / "o" / "train" / d["class"] / f"{d['cluster']:04d}.png"))
        assert png.shape == cands[(int(i), d["candidate"])].shape
        for j in range(3):
            assert np.array_equal(png, cands[(int(i), j)]) == (j == d["candidate"]), (i, j, d)


@pytest.mark.e2e
def test_new_beta_or_top_k_generates_and_scores_nothing(refined, vlcp, tmp_path):
    before = read_manifest(refined / "out")["refinement"]
    # the tiny detector is unsure of noise images: every image stays defective at both thresholds
    for change in (["--refine-beta", "0.95"], ["--refine-top-k", "1"]):
        r = vlcp(*BASE, *change, "--force", "--out", tmp_path / "o", cache=refined / "cache")
        assert r.exit_code == 0, r.output
        m = read_manifest(tmp_path / "o")
        assert sum(c["defective"] for c in m["refinement"]["per_class"].values()) == len(before["replacements"])
        s = m["stages"]
        for name in ("synthesis", "detector", "detector_scores", "candidates", "candidate_scores"):
            assert s[name]["items_computed"] == 0 and not s[name]["model_loaded"], (change, name)
    r = vlcp(*BASE[:-2], "--refine-candidates", "4", "--force", "--out", tmp_path / "o", cache=refined / "cache")
    s = read_manifest(tmp_path / "o")["stages"]
    assert s["candidates"]["items_computed"] == len(before["replacements"])  # one more per defective image


@pytest.mark.e2e
def test_refine_command_on_own_and_foreign_folders(refined, vlcp, tmp_path):
    r = vlcp("refine", refined / "out", "--data", "digits", "--detector-epochs", "2", "--refine-candidates", "3",
             "--out", tmp_path / "own", cache=refined / "cache")
    assert r.exit_code == 0, r.output
    assert "rerunning it with --refine" in r.output
    assert read_manifest(tmp_path / "own")["stages"]["candidates"]["items_computed"] == 0
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "real",
         cache=refined / "cache")
    (tmp_path / "foreign").mkdir()
    import shutil

    for d in (tmp_path / "real" / "train").iterdir():  # a plain ImageFolder: class folders only
        if d.is_dir():
            shutil.copytree(d, tmp_path / "foreign" / d.name)
    # a detector of the user's own, as safetensors: here the one the refined run trained
    from safetensors.numpy import save_file

    from vlcp.store.cache import StageCache

    det = next(k for k in StageCache(refined / "cache").index.iterkeys() if k.startswith("detector/"))
    save_file(StageCache(refined / "cache").get("detector", det.split("/", 1)[1]).tensors, tmp_path / "det.st")
    r = vlcp("refine", tmp_path / "foreign", "--data", "digits", "--detector", tmp_path / "det.st",
             "--detector-arch", "resnet18-modified", "--out", tmp_path / "rep", cache=refined / "cache")
    assert r.exit_code == 0, r.output
    assert "detection only" in r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rep["images"]) == 20 and rep["mode"].startswith("detection only")
    assert {"file", "class", "predicted", "p_target", "defective"} <= set(rep["images"][0])
    assert rep["detector"]["source"] == str(tmp_path / "det.st")


@pytest.mark.e2e
def test_torchvision_detector_maps_imagenet_categories(monkeypatch):
    """A torchvision name as --detector: its 1000 logits are cut to the dataset's classes by name."""
    import torch
    import torchvision.models as tvm

    from vlcp.evaluation.protocols import EvalError

    cats = [f"class{i}" for i in range(1000)]
    cats[0], cats[701] = "tench", "parachute"

    class W:
        meta = {"categories": cats}

    monkeypatch.setattr(tvm, "get_model_weights", lambda name: type("E", (), {"DEFAULT": W}))
    monkeypatch.setattr(tvm, "get_model", lambda name, weights: tvm.resnet18(num_classes=1000))
    net = refine.torchvision_detector("resnet18", ["parachute, chute", "tench, Tinca tinca"], "cpu")
    with torch.no_grad():
        x = torch.zeros(2, 3, 64, 64)
        full = net.net(x)
        assert torch.equal(net(x), full[:, [701, 0]]) and net.embed(x).shape == (2, 512)
    with pytest.raises(EvalError, match="lack golf ball"):
        refine.torchvision_detector("resnet18", ["golf ball"], "cpu")


@pytest.mark.e2e
@pytest.mark.parametrize("until", ["detector", "detector_scores", "candidates", "candidate_scores", "refinement"])
def test_until_stops_at_each_refinement_stage(refined, vlcp, tmp_path, until):
    r = vlcp(*BASE, "--until", until, "--out", tmp_path / "o", cache=refined / "cache")
    assert r.exit_code == 0, r.output
    stages = list(read_manifest(tmp_path / "o")["stages"])
    assert stages[-1] == until and "output" not in stages
    assert not list((tmp_path / "o").rglob("0*.png"))  # no image folder before the output stage
