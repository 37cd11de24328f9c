"""`vlcp distill --post-sample sas`: the pool, CLIP and the selection as stages of the table."""
import json

import numpy as np
import pytest
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
    rows = [json.loads(line) for line in (tmp_path / "a" / "train" / "metadata.jsonl").read_text().splitlines()]
    protos = json.loads((tmp_path / "a" / "prototypes.json").read_text())["classes"]
    assert [r["file_name"] for r in rows] == sorted(ps["images"])
    for row in rows:  # a kept image's cluster and prompt are its prototype's (class-major index, IPC 2)
        proto = ps["images"][row["file_name"]]["prototype"]
        assert (row["class_id"], row["cluster"]) == (["0", "1"][proto // 2], proto % 2)
        assert row["prompt"] == protos[row["class_id"]]["clusters"][row["cluster"]]["prompt"]
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
    pix = {o: np.asarray(Image.open(tmp_path / o / "train" / "0" / "0000.png")) for o in "ab"}
    assert (pix["a"] == pix["b"]).all()


def test_pool_multiplier_one_warns_and_keeps_the_synthetic_set(vlcp, tmp_path):
    r = vlcp(*ARGS[:-4], "--pool-multiplier", "1", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "--pool-multiplier 1" in r.output
    m = read_manifest(tmp_path / "o")
    assert m["stages"]["pool"]["items_computed"] == 0 and len(m["post_sampling"]["images"]) == 4


def test_bad_sas_parameters_are_usage_errors(vlcp, tmp_path):
    for args, hint in ((["--sas-keep", "0"], "--sas-keep"), (["--clip-prompt", "a photo"], "--clip-prompt"),
                       (["--sas-lambda", "2"], "--sas-lambda"), (["--sas-caption-weight", "-0.1"],
                                                                 "--sas-caption-weight"),
                       (["--min-foreground", "1.5"], "--min-foreground")):
        r = vlcp(*ARGS, *args, "--out", tmp_path / "o")
        assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output


# -- vlcp's additions: --min-foreground and --sas-caption-weight in stage 1 ------------------------------
LOW_FG = "filtered: foreground under --min-foreground"


def _computed(m: dict) -> list[str]:
    return [n for n, x in m["stages"].items() if x["items_computed"] and n != "output"]


def _cut(values: list[float]) -> float:
    """A threshold between two well-separated middle values: some candidates fall under it, some do not."""
    v = sorted(values)
    i = max(range(3, len(v) - 3), key=lambda j: v[j + 1] - v[j])
    assert v[i + 1] - v[i] > 1e-5
    return round((v[i] + v[i + 1]) / 2, 7)


@pytest.mark.e2e
def test_min_foreground_drops_pool_images_in_stage_1_and_a_new_threshold_segments_nothing(vlcp, tmp_path):
    r = vlcp(*ARGS, "--min-foreground", "0.001", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    s = m["stages"]
    assert s["pool_foreground"]["items_computed"] == 12 and s["pool_foreground"]["model_loaded"]
    assert "foreground" not in s and "detector" not in s  # without --refine, F only filters the pool
    pool = m["post_sampling"]["pool"]
    fg = [rec["foreground"] for rec in pool]
    assert all(0.001 < f <= 1 for f in fg) and LOW_FG not in {rec["stage1"] for rec in pool}
    cut = _cut(fg)
    r = vlcp(*ARGS, "--min-foreground", str(cut), "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert _computed(m) == ["post_sampling"]  # the segmenter is not asked again
    assert not m["stages"]["pool_foreground"]["model_loaded"] and m["stages"]["pool_foreground"]["items_cached"] == 12
    assert m["post_sampling"]["params"]["min_foreground"] == cut
    pool = m["post_sampling"]["pool"]
    assert [rec["foreground"] for rec in pool] == fg
    for rec in pool:
        if rec["foreground"] < cut:
            assert rec["stage1"] in (LOW_FG, "back-filled") and (rec["stage1"] == "back-filled") >= rec["kept"]
        else:
            assert rec["stage1"] != LOW_FG
    assert sum(rec["stage1"] == LOW_FG for rec in pool) >= 1
    assert all(rec["why"] == LOW_FG for rec in pool if rec["stage1"] == LOW_FG)


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std() if x.std() > 1e-12 else np.zeros_like(x)


@pytest.mark.e2e
def test_caption_weight_reranks_from_the_cached_embeddings_only(vlcp, tmp_path):
    assert vlcp(*ARGS, "--out", tmp_path / "a").exit_code == 0
    r = vlcp(*ARGS, "--sas-caption-weight", "1.0", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert _computed(m) == ["post_sampling"]
    assert not m["stages"]["clip_image"]["model_loaded"] and not m["stages"]["clip_text"]["model_loaded"]
    assert m["post_sampling"]["params"]["caption_weight"] == 1.0
    for w, out in ((0.0, "a"), (1.0, "b")):
        pool = read_manifest(tmp_path / out)["post_sampling"]["pool"]
        for c in (0, 1):
            recs = [rec for rec in pool if rec["class"] == c]
            R, S, M, Q = (np.array([rec[k] for rec in recs]) for k in ("relevance", "margin", "caption_match",
                                                                        "quality"))
            # the manifest rounds every score to 6 decimals (error 5e-7); a z-score moves by up to ~3 x that over
            # its std (the value, the mean and the std each move), so the tolerance follows the spread
            tol = 5e-7 + sum(c * 3 * 5e-7 / x.std() for c, x in ((0.5, R), (0.5, S), (w, M)) if c)
            np.testing.assert_allclose(Q, 0.5 * _z(R) + 0.5 * _z(S) + w * _z(M), atol=tol, rtol=0)
    # the prototype's prompt as relevance anchor: relevance is then the caption match itself
    r = vlcp(*ARGS, "--sas-anchor", "prototype", "--out", tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    assert _computed(m) == ["post_sampling"]  # the prompts were embedded for the caption match already
    np.testing.assert_allclose([rec["relevance"] for rec in m["post_sampling"]["pool"]],
                               [rec["caption_match"] for rec in m["post_sampling"]["pool"]], atol=2e-6)


# -- SAS, then refinement: the pool first ----------------------------------------------------------------
REFINE = ["--refine", "--detector-epochs", "1", "--refine-candidates", "2", "--refine-beta", "0.5",
          "--sas-per-prototype"]


@pytest.mark.e2e
def test_refinement_after_sas_takes_the_next_ranked_pool_candidate_before_generating(vlcp, tmp_path, monkeypatch):
    """A stand-in detector: kept images are wrong; an unpicked pool image of an even prototype (0 or 2) is
    right, of an odd one wrong; new candidates are unsure. So the kept image of prototypes 0 and 2 takes its
    prototype's best-ranked unpicked candidate, those of 1 and 3 walk both of theirs and get new candidates."""
    from vlcp.method import refine
    from vlcp.pipeline.stages import post_sampling as sas_stages
    from vlcp.store.arrays import array_hash

    pool: dict[str, dict] = {}
    adopt = sas_stages._adopt

    def spy(run, picked):
        pool.update({array_hash(im): rec for im, rec in zip(run.st.pool_images, run.st.pool_records)})
        adopt(run, picked)

    def verdicts(net, images, p, device):
        out = []
        for im in images:
            rec = pool.get(array_hash(im))
            c = rec["class"] if rec else 0
            right = rec is not None and not rec["kept"] and rec["prototype"] % 2 == 0
            probs = [0.5, 0.5] if rec is None else [0.9 if (k == c) == right else 0.1 for k in (0, 1)]
            out.append({"pred": int(np.argmax(probs)), "probs": probs, "feature": np.ones(4, np.float32)})
        return out

    monkeypatch.setattr(sas_stages, "_adopt", spy)
    monkeypatch.setattr(refine, "scores_of", verdicts)
    r = vlcp(*ARGS, *REFINE, "--min-foreground", "0.001", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    s, ref, recs = m["stages"], m["refinement"], m["post_sampling"]["pool"]
    assert s["foreground"]["items_computed"] == 0 and s["foreground"]["items_cached"] == 4  # pool_foreground's
    assert s["pool_replacements"]["items_computed"] == 8  # the two unpicked candidates of each prototype
    by_proto = {}
    for i, d in ref["pool_replacements"].items():
        assert d["source"] == "pool" and recs[d["was"]]["kept"]
        by_proto[recs[d["was"]]["prototype"]] = (int(i), d)
    assert sorted(by_proto) == [0, 1, 2, 3]  # every kept image was defective
    for proto, (i, d) in by_proto.items():
        free = sorted((rec["rank"], rec["index"]) for rec in recs if rec["prototype"] == proto and not rec["kept"])
        if proto % 2 == 0:  # the best-ranked unpicked candidate is right: it replaces the kept image
            assert d["candidate"] == free[0][1] and d["rank"] == free[0][0] and d["visited"] == [free[0][1]]
            assert str(i) not in ref["replacements"]
            shown = m["post_sampling"]["images"][f"{d['class']}/{d['cluster']:04d}.png"]  # the image now there
            assert shown["rank"] == d["rank"] and shown["why"].startswith("pool replacement (rank")
        else:  # both unpicked candidates are wrong, in rank order: new candidates are generated
            assert d["candidate"] is None and d["visited"] == [k for _, k in free]
            assert ref["replacements"][str(i)]["source"] == "generated"
    still = sum(d["candidate"] is None for d in ref["pool_replacements"].values())
    assert still == 2 and ref["generated_for"] == still
    assert s["candidates"]["items_computed"] == 2 * still and s["candidates"]["items_cached"] == 0  # none a pool image
    assert s["candidate_scores"]["items_computed"] == 2 * still
    for f in ("0", "1"):
        pc = ref["per_class"][f]
        assert pc["defective_before_pool"] == 2 and pc["pool_replaced"] == 1 and pc["defective"] == 1
    assert (tmp_path / "a" / "preview_refined.png").is_file()  # before -> after, pool replacements included
