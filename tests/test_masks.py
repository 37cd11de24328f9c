"""Object masks (vlcp's reading of the multi-modal paper's abstract): CLIPSeg plumbing, foreground-weighted
prototypes, the --min-foreground criterion, reruns and bad input."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_manifest
from vlcp.method import refine
from vlcp.method.clusters import class_clusters
from vlcp.models import segment
from vlcp.pipeline.stages import masks as ms
from vlcp.store.cache import Entry

ARGS = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "8", "--ipc", "1",
        "--steps", "2", "--no-finetune"]
REFINE = ["--refine", "--detector-epochs", "1", "--refine-candidates", "2", "--refine-beta", "1.0"]


@pytest.fixture(scope="module")
def clipseg(clipseg_dir):
    from vlcp.models.loading import ModelRef

    return segment.load_segmenter(ModelRef(str(clipseg_dir), str(clipseg_dir), "local:test", None, True), "cpu")


def _square(side: int = 40, box=(10, 30)) -> np.ndarray:
    """A white square (the object) on black: the object covers box x box."""
    a = np.zeros((side, side, 3), np.uint8)
    a[box[0]:box[1], box[0]:box[1]] = 255
    return a


def _run(vlcp, cache, *args):
    r = vlcp(*args, cache=cache)
    assert r.exit_code == 0, r.output
    return r


def _computed(m: dict) -> list[str]:
    return [s for s, r in m["stages"].items() if s != "output" and r["items_computed"] > 0]


# -- CLIPSeg plumbing --------------------------------------------------------------------------------
def test_masks_are_soft_at_the_requested_size_and_do_not_depend_on_the_batch(clipseg):
    model, processor = clipseg
    images = [_square(), np.zeros((20, 30), np.uint8), Image.fromarray(_square(64, (0, 32)))]
    prompts = ["a square", "a square", "a white square"]
    m = segment.masks_for(model, processor, images, prompts, 16, batch_size=3)
    assert m.shape == (3, 16, 16) and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0 and m.std() > 0
    one_by_one = np.concatenate([segment.masks_for(model, processor, [im], [t], 16, 1)
                                 for im, t in zip(images, prompts)])
    np.testing.assert_allclose(m, one_by_one, atol=1e-5)
    assert segment.masks_for(model, processor, images[:1], prompts[:1], 4).shape == (1, 4, 4)
    np.testing.assert_allclose(segment.foreground_fraction(m), m.reshape(3, -1).mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        segment.masks_for(model, processor, images[:2], prompts[:1], 16)


def test_the_tiny_clipseg_is_rebuilt_identically_when_damaged(clipseg_dir, tmp_path):
    from vlcp.models.loading import dir_digest
    from vlcp.store.cache import StageCache

    d = tmp_path / "models" / segment.TINY_CLIPSEG
    shutil.copytree(clipseg_dir, d)
    before = dir_digest(d, StageCache(tmp_path / "c1"))
    (d / "model.safetensors").write_bytes(b"truncated")
    assert segment.tiny_clipseg(tmp_path / "models") == d
    assert dir_digest(d, StageCache(tmp_path / "c2")) == before


def test_the_segmenter_sees_the_image_as_the_vae_did():
    from vlcp.method.latents import preprocess

    img = Image.fromarray(_square(40)[:, :20])  # 40 x 20: centre crop and plain resize differ
    for crop in ("none", "center"):
        view = ms._segmenter_view(img, 16, crop)
        assert view.shape == (16, 16, 3) and view.dtype == np.uint8
        np.testing.assert_allclose(view / 127.5 - 1.0, preprocess(img, 16, crop).transpose(1, 2, 0), atol=1 / 127)
    assert not np.array_equal(ms._segmenter_view(img, 16, "none"), ms._segmenter_view(img, 16, "center"))


# -- foreground weighting ------------------------------------------------------------------------------
def test_weighting_multiplies_every_channel_by_the_mask():
    z = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    m = np.array([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 1.0]]], np.float32)
    w = ms.weighted(z, m)
    np.testing.assert_array_equal(w[0, 1], [[4.0, 0.0], [3.0, 0.0]])
    np.testing.assert_array_equal(w[1, 0], [[0.0, 0.0], [0.0, 11.0]])
    with pytest.raises(ValueError, match="do not fit"):
        ms.weighted(z, m[:, :1])
    assert ms.is_empty(np.full((4, 4), 0.49)) and not ms.is_empty(np.pad([[0.5]], 1))


def _fake_run(z: np.ndarray, masks: np.ndarray, fallback=()):
    st = SimpleNamespace(lat_entries=[Entry({}, {"latent": zi}) for zi in z],  # read() as the stage's entries
                         mask_entries=[Entry({}, {"mask": mi}) for mi in masks],
                         mask_fallback=set(fallback))
    return SimpleNamespace(st=st)


def test_foreground_weighted_clusters_group_by_object_and_start_from_unmasked_means():
    # one channel, 2 x 2 latents: the object is pixel (0, 0), the rest is background (and louder)
    obj, bg = [1, 1, -1, -1], [5, -5, 5, -5]  # images 0,1 share the object; 0,2 share the background
    z = np.stack([np.array([[[o, b], [b, b]]], np.float32) for o, b in zip(obj, bg)])
    masks = np.tile(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), (4, 1, 1))
    rows = [10, 11, 12, 13]  # dataset indices of the class's images
    run = _fake_run(np.concatenate([np.zeros((10,) + z.shape[1:], np.float32), z]),
                    np.concatenate([np.zeros((10, 2, 2), np.float32), masks]))

    _, plain, _ = class_clusters(z, rows, 2, 0, False)
    assert sorted(sorted(m) for m in plain) == [[10, 12], [11, 13]]  # by background
    feats = ms.features(run, rows, 0, True)
    _, members, _ = class_clusters(feats, rows, 2, 0, False)
    assert sorted(sorted(m) for m in members) == [[10, 11], [12, 13]]  # by object
    centres = ms.unmasked_centres(run, members)
    by_object = {tuple(sorted(m)): c for m, c in zip(members, centres)}
    np.testing.assert_array_equal(by_object[(10, 11)], [[[1, 0], [0, 0]]])  # the backgrounds average out
    np.testing.assert_array_equal(by_object[(12, 13)], [[[-1, 0], [0, 0]]])
    np.testing.assert_array_equal(ms.features(run, rows, 0, False), z)  # off: the latents themselves
    fallback = _fake_run(np.stack([e.tensors["latent"] for e in run.st.lat_entries]),
                         np.zeros((14, 2, 2), np.float32), fallback={0})
    np.testing.assert_array_equal(ms.features(fallback, rows, 0, True), z)  # empty masks: unmasked


# -- the --min-foreground criterion ------------------------------------------------------------------
def test_images_under_min_foreground_are_defective_and_such_candidates_not_valid():
    assert ms.below([0.05, 0.2, 0.1], 0.1) == {0} and ms.below([0.0, 1.0], None) == set()
    confident = {"pred": 0, "probs": [0.99, 0.01], "feature": [1.0, 0.0]}
    scores = [confident, dict(confident, feature=[0.0, 1.0])]
    assert refine.select(["a", "b"], [0, 0], scores, {}, 0.5, 1)["per_class"]["a"]["defective"] == 0
    judged = ms.as_judged(scores, ms.below([0.05, 0.6], 0.1))
    assert judged[0]["pred"] == -1 and judged[1] is scores[1] and scores[0]["pred"] == 0  # input untouched
    cands = [{"pred": 0, "probs": [0.95, 0.05], "feature": [1.0, 1.0]},  # the more confident, but no object
             {"pred": 0, "probs": [0.8, 0.2], "feature": [1.0, 1.0]}]
    plain = refine.select(["a", "b"], [0, 0], judged, {0: cands}, 0.5, 1)
    assert plain["per_class"]["a"]["defective"] == 1 and plain["replacements"][0]["candidate"] == 0
    cands = ms.as_judged(cands, ms.below([0.02, 0.4], 0.1))
    sel = refine.select(["a", "b"], [0, 0], judged, {0: cands}, 0.5, 1)
    assert sel["replacements"][0]["candidate"] == 1 and sel["replacements"][0]["how"] == "valid"


# -- end to end ----------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_object_masks_and_min_foreground_end_to_end_and_reruns(vlcp, seg_cache, tmp_path):
    from vlcp.store.cache import StageCache

    _run(vlcp, seg_cache, *ARGS, "--object-masks", *REFINE, "--min-foreground", "0.1", "--out", tmp_path / "a")
    m = read_manifest(tmp_path / "a")
    s = m["stages"]
    assert s["masks"]["items_computed"] == 16 and s["masks"]["model_loaded"]
    assert s["foreground"]["items_computed"] == 2 and s["candidate_foreground"]["items_computed"] == 4
    om = m["object_masks"]
    assert om["method"].startswith("vlcp's reading") and "not the authors' method" in om["method"]
    assert sorted(om["classes"]) == ["0", "1"] and m["models"]["segmenter"]["identity"] == om["segmenter"]
    names = {c["folder"]: c["name"] for c in m["classes"]}
    for f, c in om["classes"].items():
        assert 0 < c["mean_foreground"] < 1 and len(c["clusters"]) == 1 and not c["fallback_unmasked"]
        assert c["prompt"] == names[f]  # no --mask-prompt: the class name
    fc = m["foreground_check"]
    assert fc["min_foreground"] == 0.1 and sorted(fc["per_class"]) == ["0", "1"]
    # a mask is stored per image at the latent resolution (the shape of the image's latent)
    cache = StageCache(seg_cache)
    masks = [cache.get("masks", k).tensors["mask"] for k in _keys(cache, "masks")]
    latent = cache.get("latents", _keys(cache, "latents")[0])
    assert len(masks) == 16 and {mk.shape for mk in masks} == {latent.tensors["latent"].shape[1:]}
    assert latent.tensors["latent"].shape[1:] == (om["latent_size"],) * 2
    assert all(mk.dtype == np.float32 and 0 <= mk.min() and mk.max() <= 1 for mk in masks)
    cache.close()

    # --min-foreground rescores nothing (--refine-beta 1.0: every image is defective either way)
    _run(vlcp, seg_cache, *ARGS, "--object-masks", *REFINE, "--min-foreground", "0.9", "--out", tmp_path / "b")
    assert _computed(read_manifest(tmp_path / "b")) == ["refinement"]
    # toggling --object-masks recomputes outliers onward; captions, latents and masks are reused
    _run(vlcp, seg_cache, *ARGS, *REFINE, "--min-foreground", "0.1", "--out", tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    assert "masks" not in m["stages"] and "object_masks" not in m
    assert _computed(m)[:2] == ["outliers", "clusters"]
    assert not {"images", "captions", "latents"} & set(_computed(m))
    _run(vlcp, seg_cache, *ARGS, "--object-masks", *REFINE, "--min-foreground", "0.1", "--out", tmp_path / "d")
    assert _computed(read_manifest(tmp_path / "d")) == []


def _keys(cache, stage: str) -> list[str]:
    return [k.split("/", 1)[1] for k in cache.index if k.startswith(stage + "/")]


@pytest.mark.e2e
def test_a_class_whose_masks_are_all_empty_falls_back_to_unmasked_latents(vlcp, seg_cache, tmp_path, monkeypatch):
    real = segment.masks_for

    def no_zero(model, processor, images, prompts, size, batch_size=16):
        got = real(model, processor, images, prompts, size, batch_size)
        return np.stack([np.zeros_like(g) if p.endswith("0") else g for g, p in zip(got, prompts)])

    monkeypatch.setattr(segment, "masks_for", no_zero)
    r = _run(vlcp, seg_cache, *ARGS, "--object-masks", "--until", "clusters", "--out", tmp_path / "o")
    assert "class 0: the object mask is empty for every image" in r.output
    classes = read_manifest(tmp_path / "o")["object_masks"]["classes"]
    assert classes["0"]["fallback_unmasked"] and classes["0"]["mean_foreground"] == 0.0
    assert not classes["1"]["fallback_unmasked"]
    assert any("unmasked latents" in w for w in read_manifest(tmp_path / "o")["warnings"])


@pytest.mark.e2e
def test_a_mask_prompt_recomputes_the_masks_and_what_follows_not_the_captions(vlcp, seg_cache, tmp_path):
    until = [*ARGS, "--object-masks", "--until", "clusters"]
    _run(vlcp, seg_cache, *until, "--out", tmp_path / "a")
    _run(vlcp, seg_cache, *until, "--mask-prompt", "a digit", "--out", tmp_path / "b")
    m = read_manifest(tmp_path / "b")
    assert _computed(m) == ["masks", "outliers", "clusters"] and m["stages"]["masks"]["items_computed"] == 16
    assert {c["prompt"] for c in m["object_masks"]["classes"].values()} == {"a digit"}


@pytest.mark.parametrize("args, hint", [
    (["--object-masks", "--mask-prompt", "  "], "--mask-prompt"),
    (["--min-foreground", "0.1"], "add --refine"),
    (["--refine", "--min-foreground", "1.5"], "--min-foreground"),
])
def test_bad_mask_options_are_usage_errors(vlcp, tmp_path, args, hint):
    r = vlcp(*ARGS, *args, "--out", tmp_path / "o")
    assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output


@pytest.mark.e2e
def test_a_missing_segmenter_offline_is_a_one_line_error(vlcp, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = vlcp(*ARGS, "--object-masks", "--segmenter", "no-such-org/no-such-clipseg", "--out", tmp_path / "o")
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(lines) == 1 and "download no-such-org/no-such-clipseg" in lines[0]
