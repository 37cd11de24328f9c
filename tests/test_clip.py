"""The tiny CLIP, cached embeddings, and ``vlcp select`` (vlcp's formulation of SAS) end to end on a folder pool."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlcp.models import clip
from vlcp.store.cache import StageCache, file_digest


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return clip.tiny_clip(tmp_path_factory.mktemp("clip") / "models")


@pytest.fixture
def clip_cache(cache_dir, tiny_clip_dir) -> Path:
    """The test's cache, holding the tiny CLIP (built once per session, copied)."""
    shutil.copytree(tiny_clip_dir, cache_dir / "models" / clip.TINY_CLIP)
    return cache_dir


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_dir):
    from vlcp.models.loading import ModelRef

    ref = ModelRef(str(tiny_clip_dir), str(tiny_clip_dir), "local:test")
    return clip.load_clip(ref, "cpu")


def noise(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_tiny_clip_is_built_reproducibly(tiny_clip_dir, tmp_path):
    again = clip.tiny_clip(tmp_path / "models")
    assert {f.name for f in again.iterdir()} >= {"config.json", "model.safetensors", "processor_config.json"}
    assert file_digest(again / "model.safetensors") == file_digest(tiny_clip_dir / "model.safetensors")
    assert not list((tmp_path / "models").glob(".build-*"))  # built atomically: no temp folder left


def test_embeddings_are_unit_vectors_and_batching_does_not_change_them(tiny_clip_model):
    model, processor = tiny_clip_model
    images = [noise(i, 16 + 4 * i) for i in range(5)]
    a = clip.embed_images(model, processor, images, "cpu", batch_size=2)
    b = clip.embed_images(model, processor, images, "cpu", batch_size=5)
    assert a.shape == (5, model.config.projection_dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a[0], a[1])
    t = clip.embed_texts(model, processor, ["a photo of a tench.", "a photo of a golf ball.", "a photo of a tench."])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    assert not np.allclose(t[0], t[1])


def test_cached_embeddings_compute_only_missing_items_and_never_load_clip_when_all_cached(tmp_path, tiny_clip_dir):
    from vlcp.store.runner import Lazy

    cache = StageCache(tmp_path / "c")
    ref = clip.resolve_clip(str(tiny_clip_dir), False, cache)
    images = [noise(i) for i in range(4)]
    digests = [clip.pixel_hash(im) for im in images]
    loads = []

    def load(i):
        loads.append(i)
        return images[i]

    model = Lazy(lambda: clip.load_clip(ref, "cpu"))
    first, rep = clip.cached_image_embeddings(cache, ref, digests[:3], load, model, 2, False)
    assert (rep.items_computed, rep.items_cached, rep.model_loaded) == (3, 0, True)
    cold = Lazy(lambda: clip.load_clip(ref, "cpu"))
    both, rep = clip.cached_image_embeddings(cache, ref, digests, load, cold, 2, False)
    assert (rep.items_computed, rep.items_cached) == (1, 3) and loads == [0, 1, 2, 3]
    np.testing.assert_array_equal(both[:3], first)
    cold = Lazy(lambda: clip.load_clip(ref, "cpu"))
    _, rep = clip.cached_image_embeddings(cache, ref, digests, load, cold, 2, False)
    assert (rep.items_computed, cold.loaded) == (0, False)


def test_a_missing_clip_offline_is_a_one_line_model_error(tmp_path, monkeypatch):
    from vlcp.models.loading import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match=r"(hf|huggingface-cli) download no-such-org/no-such-clip"):
        clip.resolve_clip("no-such-org/no-such-clip", False, StageCache(tmp_path / "c"))


def test_class_prompts_need_the_placeholder():
    assert clip.class_prompts(["tench", "golf ball"]) == ["a photo of a tench.", "a photo of a golf ball."]
    with pytest.raises(ValueError, match="no {name} placeholder"):
        clip.class_prompts(["tench"], "a photo")


# -- vlcp select -------------------------------------------------------------------------------------
def make_pool(root: Path, counts: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """Class folders of noise PNGs (lossless, so decoded pixels equal the arrays)."""
    arrays = {}
    for k, (folder, n) in enumerate(counts.items()):
        d = root / folder
        d.mkdir(parents=True)
        arrays[folder] = [noise(100 * k + j) for j in range(n)]
        for j, a in enumerate(arrays[folder]):
            Image.fromarray(a).save(d / f"cand{j}.png")
    return arrays


def read_png(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGB"))


@pytest.mark.e2e
def test_select_end_to_end_and_a_rerun_computes_no_embedding(vlcp, clip_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("VLCP_DEVICE", "cpu")  # compared below with a CPU fp32 embedding (CUDA runs CLIP in fp16)
    pool = tmp_path / "pool"
    arrays = make_pool(pool, {"0": 5, "handwritten digit 1": 5, "2": 5})  # a folder may use the class name
    out = tmp_path / "out"
    r = vlcp("select", pool, "--data", "digits", "--ipc", 2, "--out", out, "--tiny")
    assert r.exit_code == 0, r.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json", "preview.png", "preview_pool.png", "train/0/0000.png", "train/0/0001.png",
                     "train/1/0000.png", "train/1/0001.png", "train/2/0000.png", "train/2/0001.png",
                     "train/metadata.jsonl"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"].startswith("vlcp's formulation of SAS") and "not the authors' method" in m["method"]
    assert m["stages"]["clip_image"]["items_computed"] == 15 and m["stages"]["clip_text"]["items_computed"] == 10
    assert m["parameters"]["lam"] == 0.5 and m["parameters"]["mode"] == "sas"
    cands = m["candidates"]
    assert len(cands) == 15 and sum(c["kept"] for c in cands) == 6
    assert {c["class"] for c in cands} == {"0", "1", "2"}
    for c in cands:  # every kept candidate went to its output file, pixel for pixel
        assert c["kept"] == bool(c["output"])
        folder, j = c["source"].split("/")[0], int(c["source"].split("cand")[1].split(".")[0])
        for o in c["output"]:
            np.testing.assert_array_equal(read_png(out / "train" / o), arrays[folder][j])
    assert [k["source"].split("/")[-2] for k in m["classes"]["1"]["kept"]] == ["handwritten digit 1"] * 2

    # the manifest's relevance is the cached image embedding against the class prompt's embedding
    model, processor = clip.load_clip(clip.resolve_clip(None, True, StageCache(clip_cache)), "cpu")
    first = next(c for c in cands if c["class"] == "2")
    v = clip.embed_images(model, processor, [read_png(pool / first["source"])])
    t = clip.embed_texts(model, processor, ["a photo of a handwritten digit 2."])
    assert first["relevance"] == pytest.approx(float(v[0] @ t[0]), abs=1e-5)

    r = vlcp("select", pool, "--data", "digits", "--ipc", 2, "--out", out, "--tiny", "--sas-lambda", 0.1, "--force")
    assert r.exit_code == 0, r.output
    m2 = json.loads((out / "manifest.json").read_text())
    for stage in ("clip_image", "clip_text"):
        assert m2["stages"][stage]["items_computed"] == 0 and m2["stages"][stage]["model_loaded"] is False
    assert m2["stages"]["clip_image"]["items_cached"] == 15 and m2["parameters"]["lam"] == 0.1
    assert [c["relevance"] for c in m2["candidates"]] == [c["relevance"] for c in cands]
    assert "clip_image: 0 computed, 15 cached" in r.output

    # a fully cached selection in a fresh process never imports torch
    code = ("import sys; from click.testing import CliRunner; from vlcp.cli.main import cli\n"
            "r = CliRunner().invoke(cli, sys.argv[1:]); print(r.output)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    args = ["--cache-dir", str(clip_cache), "select", str(pool), "--data", "digits", "--ipc", "2", "--out", str(out),
            "--tiny", "--select", "relevance", "--force"]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    assert "clip_image: 0 computed, 15 cached" in res and res.strip().endswith("NO-TORCH"), res


@pytest.mark.e2e
def test_select_random_is_seeded(vlcp, clip_cache, tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool, {"0": 8})
    kept = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        r = vlcp("select", pool, "--data", "digits", "--ipc", 3, "--out", tmp_path / name, "--tiny",
                 "--select", "random", "--seed", seed)
        assert r.exit_code == 0, r.output
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        kept.append([k["source"] for k in m["classes"]["0"]["kept"]])
    assert kept[0] == kept[1] != kept[2]


@pytest.mark.e2e
def test_select_bad_pools(vlcp, clip_cache, tmp_path):
    make_pool(tmp_path / "nomatch", {"cat": 3})
    r = vlcp("select", tmp_path / "nomatch", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o1", "--tiny")
    assert r.exit_code == 2 and "class folder(s) cat match no class of digits" in r.output
    assert "Traceback" not in r.output

    make_pool(tmp_path / "small", {"0": 4, "1": 1})
    r = vlcp("select", tmp_path / "small", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o2", "--tiny")
    assert r.exit_code == 1
    assert ("pool class folder 1 (1) holds 1 usable image(s), fewer than --ipc 2; pass --allow-duplicates"
            in r.output)
    assert not (tmp_path / "o2").exists()

    r = vlcp("select", tmp_path / "small", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o2", "--tiny",
             "--allow-duplicates")
    assert r.exit_code == 0, r.output
    assert "at most --ipc 2 images: there the selection is the identity" in r.output
    np.testing.assert_array_equal(read_png(tmp_path / "o2/train/1/0000.png"), read_png(tmp_path / "o2/train/1/0001.png"))

    r = vlcp("select", tmp_path / "small", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o3", "--tiny",
             "--clip-prompt", "a photo")
    assert r.exit_code == 1 and "has no {name} placeholder" in r.output

    r = vlcp("select", tmp_path / "small", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o2", "--tiny")
    assert r.exit_code == 2 and "not empty; pass --force" in r.output


@pytest.mark.e2e
def test_select_with_a_missing_clip_offline_says_what_to_download(vlcp, clip_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make_pool(tmp_path / "pool", {"0": 3})
    r = vlcp("select", tmp_path / "pool", "--data", "digits", "--ipc", 2, "--out", tmp_path / "o",
             "--clip", "no-such-org/no-such-clip")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "download no-such-org/no-such-clip" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_select_skips_unreadable_images_and_lists_them(vlcp, clip_cache, tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool, {"0": 3})
    (pool / "0" / "broken.png").write_bytes(b"not a png")
    r = vlcp("select", pool, "--data", "digits", "--ipc", 2, "--out", tmp_path / "o", "--tiny")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [Path(s["source"]).name for s in m["skipped_images"]] == ["broken.png"]
    assert m["classes"]["0"]["pool_images"] == 4 and m["classes"]["0"]["usable"] == 3
    assert "skipped 1 unreadable image(s)" in r.output
    # the file relative to the pool the user gave; PIL's message quotes its absolute path, cut to the name
    assert m["warnings"] == ["skipped 1 unreadable image(s) in the pool, e.g. 0/broken.png: "
                             "cannot identify image file 'broken.png'"]
    assert m["skipped_images"][0]["error"] == "broken.png: cannot identify image file 'broken.png'"
    assert str(tmp_path) not in json.dumps(m["warnings"])


@pytest.mark.e2e
def test_select_with_real_image_centroids_as_anchors(vlcp, clip_cache, tmp_path, monkeypatch):
    from vlcp.data.datasets import load_dataset

    monkeypatch.setenv("VLCP_DEVICE", "cpu")  # compared below with CPU fp32 embeddings (CUDA runs CLIP in fp16)
    pool = tmp_path / "pool"
    make_pool(pool, {"3": 4, "7": 4})
    args = ("select", pool, "--data", "digits", "--ipc", 2, "--tiny", "--anchor", "centroid", "--max-per-class", 3)
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["anchor"]["kind"] == "real-image class centroid" and set(m["anchor"]["images_per_class"].values()) == {3}
    assert m["stages"]["clip_real"]["items_computed"] == 30 and "clip_text" not in m["stages"]
    # relevance = the candidate's embedding . the unit mean embedding of the first 3 real images of its class
    model, processor = clip.load_clip(clip.resolve_clip(None, True, StageCache(clip_cache)), "cpu")
    real = [s for s in load_dataset("digits", tmp_path, "train", max_per_class=3).samples if s.class_idx == 7]
    e = clip.embed_images(model, processor, [np.asarray(s.load()) for s in real]).mean(0)
    cand = next(c for c in m["candidates"] if c["class"] == "7")
    v = clip.embed_images(model, processor, [read_png(pool / cand["source"])])[0]
    assert cand["relevance"] == pytest.approx(float(v @ e / np.linalg.norm(e)), abs=1e-5)

    r = vlcp(*args, "--out", tmp_path / "o", "--force", "--sas-alpha", 1)
    m2 = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m2["stages"]["clip_real"]["items_computed"] == 0 and m2["stages"]["clip_image"]["items_computed"] == 0


@pytest.mark.e2e
def test_centroids_leave_unreadable_real_images_out(vlcp, clip_cache, tmp_path):
    real = tmp_path / "real"
    make_pool(real, {"a": 2, "b": 2})
    (real / "a" / "zz-broken.png").write_bytes(b"not an image")
    pool = tmp_path / "pool"
    make_pool(pool, {"a": 3, "b": 3})
    r = vlcp("select", pool, "--data", real, "--ipc", 2, "--tiny", "--anchor", "centroid", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["anchor"]["images_per_class"] == {"a": 2, "b": 2}
    assert m["stages"]["clip_real"]["items_computed"] == 5
    assert all(c["relevance"] is not None for c in m["candidates"])
