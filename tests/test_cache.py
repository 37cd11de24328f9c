"""Cache semantics: keys, hits and misses, per-item reuse, corruption, concurrent writers."""
import logging
import multiprocessing as mp

import numpy as np
import pytest

from vlcp.cache import StageCache, stable_hash, stage_key
from vlcp.runner import Lazy, run_items, run_stage


def test_stable_hash_ignores_dict_order_but_not_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


@pytest.mark.parametrize("change", [
    {"stage": "latents"}, {"version": 2}, {"image": "other"}, {"model": "sd@def"}, {"resolution": 256}])
def test_every_key_part_invalidates(change):
    base = dict(stage="captions", version=1, image="abc", model="sd@abc", resolution=512)
    changed = {**base, **change}
    assert stage_key(**base) == stage_key(**dict(base))
    assert stage_key(**changed) != stage_key(**base)


def test_put_get_roundtrip_json_and_tensors(tmp_path):
    c = StageCache(tmp_path)
    assert c.get("latents", "k1") is None
    c.put("latents", "k1", {"note": "x"}, {"latent": np.arange(6, dtype=np.float32).reshape(2, 3)})
    e = StageCache(tmp_path).get("latents", "k1")  # a fresh process view
    assert e.meta == {"note": "x"} and e.tensors["latent"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temp files


def test_corrupt_blob_is_detected_logged_and_recomputed(tmp_path, caplog):
    c = StageCache(tmp_path)
    c.put("latents", "k1", {}, {"latent": np.ones(100, np.float32)})
    (blob,) = list((tmp_path / "blobs").rglob("*.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-10])  # truncated
    calls = []

    def compute():
        calls.append(1)
        return {}, {"latent": np.ones(100, np.float32)}

    with caplog.at_level(logging.WARNING, logger="vlcp"):
        e, rep = run_stage(c, "latents", "k1", compute)
    assert calls == [1] and not rep.cached and c.corrupt == 1
    assert "corrupt" in caplog.text
    assert run_stage(c, "latents", "k1", compute)[1].cached  # healthy again


def test_corrupt_metadata_is_detected(tmp_path):
    c = StageCache(tmp_path)
    c.put("captions", "k", {"caption": "a dog"})
    rec = c.index["captions/k"]
    rec["meta"] = rec["meta"].replace("dog", "cat")
    c.index["captions/k"] = rec
    assert c.get("captions", "k") is None and c.corrupt == 1


def _items(keys):
    def compute(idx):
        return (({"v": keys[i]}, None) for i in idx)
    return compute


def test_per_item_reuse_after_adding_items_and_duplicates(tmp_path):
    c = StageCache(tmp_path)
    keys = ["a", "b", "c"]
    entries, rep = run_items(c, "captions", keys, _items(keys), batch_size=2, progress=False)
    assert (rep.items_computed, rep.items_cached, rep.cached) == (3, 0, False)
    keys2 = ["a", "b", "c", "d", "d"]  # one new image, present twice
    entries, rep = run_items(c, "captions", keys2, _items(keys2), batch_size=2, progress=False)
    assert (rep.items_computed, rep.items_cached) == (1, 4)
    assert [e.meta["v"] for e in entries] == keys2


def test_killed_run_keeps_finished_items(tmp_path):
    c = StageCache(tmp_path)
    keys = [f"k{i}" for i in range(6)]

    def dies_after_four(idx):
        for i in idx:
            if i == 4:
                raise KeyboardInterrupt
            yield {"v": i}, None

    with pytest.raises(KeyboardInterrupt):
        run_items(c, "captions", keys, dies_after_four, batch_size=2, progress=False)
    _, rep = run_items(c, "captions", keys, _items(keys), batch_size=2, progress=False)
    assert (rep.items_computed, rep.items_cached) == (2, 4)


def test_lazy_model_not_loaded_when_everything_is_cached(tmp_path):
    c = StageCache(tmp_path)
    loads = []
    model = Lazy(lambda: loads.append(1) or "model")

    def compute(idx):
        model()
        return (({}, None) for _ in idx)

    _, rep = run_items(c, "captions", ["x"], compute, 1, model, progress=False)
    assert rep.model_loaded and loads == [1]
    model2 = Lazy(lambda: loads.append(2))
    _, rep = run_items(c, "captions", ["x"], compute, 1, model2, progress=False)
    assert not rep.model_loaded and loads == [1]


def _writer(root, worker):
    c = StageCache(root)
    for i in range(40):
        c.put("latents", f"k{i}", {"i": i}, {"z": np.full(64, i, np.float32)})
        c.get("latents", f"k{(i * 7) % 40}")


def test_two_processes_sharing_a_cache_never_corrupt_it(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = StageCache(tmp_path)
    for i in range(40):
        e = c.get("latents", f"k{i}")
        assert e is not None and e.meta == {"i": i} and float(e.tensors["z"][0]) == i
    assert c.corrupt == 0


def test_stats_and_clear(tmp_path):
    c = StageCache(tmp_path)
    c.put("captions", "a", {"caption": "x"})
    c.put("latents", "b", {}, {"z": np.zeros(10, np.float32)})
    s = c.stats()
    assert s["captions"]["entries"] == 1 and s["latents"]["bytes"] > 40
    assert c.clear("latents") == 1
    assert "latents" not in c.stats() and c.get("captions", "a") is not None
    assert not (tmp_path / "blobs" / "latents").exists()
