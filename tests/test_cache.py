"""Cache semantics: keys, hits and misses, per-item reuse, corruption, concurrent writers."""
import hashlib
import json
import logging
import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest

from vlcp.store.cache import CorruptEntry, Entry, StageCache, stable_hash, stage_key
from vlcp.store.runner import Lazy, run_items, run_stage


def test_stable_hash_ignores_dict_order_but_not_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_stage_key_is_sha256_of_canonical_json():
    # written out by hand: sorted keys, no whitespace, first 32 hex digits of SHA-256
    text = b'{"image":"abc","model":"sd@abc","resolution":512,"stage":"captions","version":1}'
    expected = hashlib.sha256(text).hexdigest()[:32]
    assert stage_key("captions", 1, resolution=512, model="sd@abc", image="abc") == expected
    assert stable_hash({"a": 1}, n=8) == hashlib.sha256(b'{"a":1}').hexdigest()[:8]


@pytest.mark.parametrize("change", [
    {"stage": "latents"}, {"version": 2}, {"image": "other"}, {"model": "sd@def"}, {"resolution": 256}])
def test_every_key_part_invalidates(change):
    base = dict(stage="captions", version=1, image="abc", model="sd@abc", resolution=512)
    changed = {**base, **change}
    assert stage_key(**changed) != stage_key(**base)


def test_put_get_roundtrip_json_and_tensors(tmp_path):
    c = StageCache(tmp_path)
    assert c.get("latents", "k1") is None
    c.put("latents", "k1", {"note": "x"}, {"latent": np.arange(6, dtype=np.float32).reshape(2, 3)})
    e = StageCache(tmp_path).get("latents", "k1")  # a fresh process view
    assert e.meta == {"note": "x"} and e.tensors["latent"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temp files


def test_a_fresh_put_returns_the_meta_a_later_hit_returns(tmp_path):
    """Cold and cached runs write the same manifest: the entry a put returns has the hit's meta (keys
    sorted, tuples as lists), not the object the stage built."""
    c = StageCache(tmp_path)
    meta = {"b": (1, 2), "a": {"z": 1, "y": [0.5]}}
    put = c.put("outliers", "k", meta)
    hit = StageCache(tmp_path).get("outliers", "k")
    assert put.meta == hit.meta == {"a": {"y": [0.5], "z": 1}, "b": [1, 2]}
    assert list(put.meta) == list(hit.meta) == ["a", "b"] and list(put.meta["a"]) == ["y", "z"]
    assert meta == {"b": (1, 2), "a": {"z": 1, "y": [0.5]}}  # the caller's object is untouched


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


# -- recovery from damaged blobs ---------------------------------------------------------------------

LATENT = np.arange(100, dtype=np.float32)


def _one_blob(root) -> Path:
    (blob,) = list((Path(root) / "blobs").rglob("*.safetensors"))
    return blob


def _flip_payload_byte(blob: Path) -> None:
    """Flip one bit of the tensor data (not the header): same length, still a valid safetensors file."""
    from safetensors.numpy import load

    data = bytearray(blob.read_bytes())
    payload = 8 + int.from_bytes(data[:8], "little")  # 8-byte header length, JSON header, then the data
    data[payload + 41] ^= 0x01
    blob.write_bytes(bytes(data))
    parsed = load(bytes(data))["latent"]  # a parser alone would accept it: only the checksum can tell
    assert parsed.shape == LATENT.shape and not np.array_equal(parsed, LATENT)


def _damage(kind: str, blob: Path, monkeypatch) -> None:
    if kind == "missing":
        blob.unlink()
    elif kind == "bit flip":
        _flip_payload_byte(blob)
    else:  # unreadable: chmod does not stop root, so make the read itself fail
        real = Path.read_bytes

        def read_bytes(self):
            if self.name == blob.name:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)


REASON = {"missing": "unreadable: No such file", "bit flip": "checksum mismatch", "unreadable": "Permission denied"}


@pytest.mark.parametrize("kind", ["missing", "bit flip", "unreadable"])
def test_damaged_blob_is_not_cached_logged_and_counted(kind, tmp_path, monkeypatch, caplog):
    c = StageCache(tmp_path)
    c.put("latents", "k1", {"n": 1}, {"latent": LATENT})
    _damage(kind, _one_blob(tmp_path), monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        assert c.get("latents", "k1", verify=True) is None
    assert c.corrupt == 1 and not c.has("latents", "k1")  # dropped from the index
    assert "is corrupt" in caplog.text and REASON[kind] in caplog.text
    assert c.get("latents", "k1") is None and c.corrupt == 1  # plain not-cached now, not counted twice


@pytest.mark.parametrize("kind", ["missing", "bit flip", "unreadable"])
def test_damaged_blob_is_recomputed_by_the_stage(kind, tmp_path, monkeypatch, caplog):
    c = StageCache(tmp_path)
    keys = ["a", "b", "c"]
    calls = []

    def compute(idx):
        calls.extend(idx)
        return (({"i": i}, {"latent": LATENT + i}) for i in idx)

    run_items(c, "latents", keys, compute, batch_size=3, progress=False)
    _damage(kind, next((tmp_path / "blobs").rglob("b-*.safetensors")), monkeypatch)  # only b's blob
    c = StageCache(tmp_path)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        entries, rep = run_items(c, "latents", keys, compute, batch_size=3, progress=False)
        if kind != "missing":  # the blob size is right: only reading it shows the damage
            assert rep.items_cached == 3 and c.blob_reads == 0
            assert entries[0].tensors["latent"][1] == 1.0
            with pytest.raises(CorruptEntry, match="latents/b.*checksum mismatch|latents/b.*Permission"):
                entries[1].tensors
            assert not c.has("latents", "b") and c.has("latents", "a")
            entries, rep = run_items(c, "latents", keys, compute, batch_size=3, progress=False)
    assert calls == [1] and (rep.items_computed, rep.items_cached) == (1, 2)
    assert c.corrupt == 1 and "is corrupt" in caplog.text
    assert [float(e.tensors["latent"][0]) for e in entries] == [0.0, 1.0, 2.0]
    monkeypatch.undo()
    assert StageCache(tmp_path).get("latents", "b", verify=True).tensors["latent"][5] == 6.0  # healthy again


def test_whole_stage_with_a_flipped_bit_is_recomputed_after_the_corrupt_read(tmp_path):
    c = StageCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"v": len(calls)}, {"latent": LATENT}

    run_stage(c, "clusters", "k", compute)
    _flip_payload_byte(_one_blob(tmp_path))
    entry, rep = run_stage(c, "clusters", "k", compute)
    assert rep.cached and calls == [1]
    with pytest.raises(CorruptEntry) as err:
        entry.tensors
    assert (err.value.stage, err.value.key, err.value.reason[:17]) == ("clusters", "k", "checksum mismatch")
    entry, rep = run_stage(c, "clusters", "k", compute)
    assert not rep.cached and calls == [1, 1] and entry.meta == {"v": 2}
    assert np.array_equal(entry.tensors["latent"], LATENT)


# -- cheap existence checks (lazy blobs) -------------------------------------------------------------

def test_has_and_get_read_no_blob_tensors_read_once(tmp_path):
    StageCache(tmp_path).put("latents", "k", {"m": 1}, {"latent": LATENT})
    c = StageCache(tmp_path)
    assert c.has("latents", "k") and not c.has("latents", "other") and not c.has("captions", "k")
    e = c.get("latents", "k")
    assert (e.meta, e.loaded, c.blob_reads) == ({"m": 1}, False, 0)
    assert e.tensors["latent"][7] == 7.0 and e.loaded and c.blob_reads == 1
    assert e.tensors["latent"][8] == 8.0 and c.blob_reads == 1  # kept after the first read
    _one_blob(tmp_path).unlink()
    assert c.has("latents", "k") and c.blob_reads == 1  # the index alone answers has()


def test_cached_rerun_reads_no_blob(tmp_path):
    keys = [f"k{i}" for i in range(5)]

    def compute(idx):
        return (({"i": i}, {"latent": np.full(3, i, np.float32)}) for i in idx)

    run_items(StageCache(tmp_path), "latents", keys, compute, 2, progress=False)
    c = StageCache(tmp_path)
    entries, rep = run_items(c, "latents", keys, compute, 2, progress=False)
    assert (rep.items_cached, rep.items_computed, c.blob_reads) == (5, 0, 0)
    assert [e.meta["i"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[3].tensors["latent"].tolist() == [3.0, 3.0, 3.0] and c.blob_reads == 1


def test_entries_without_blob_and_fresh_puts_need_no_read(tmp_path):
    c = StageCache(tmp_path)
    put = c.put("latents", "k", {}, {"latent": LATENT})
    assert put.loaded and put.tensors["latent"] is not None
    c.put("captions", "k", {"caption": "a fox"})
    e = StageCache(tmp_path).get("captions", "k")
    assert e.loaded and e.tensors == {} and e.meta == {"caption": "a fox"}
    assert Entry({"a": 1}).tensors == {} and Entry({}, {"x": LATENT}).tensors["x"] is LATENT


def test_verify_reads_now(tmp_path):
    StageCache(tmp_path).put("latents", "k", {}, {"latent": LATENT})
    c = StageCache(tmp_path)
    e = c.get("latents", "k", verify=True)
    assert e.loaded and c.blob_reads == 1 and np.array_equal(e.tensors["latent"], LATENT)


def test_truncated_or_grown_blob_is_caught_by_its_size_without_a_read(tmp_path):
    c = StageCache(tmp_path)
    c.put("latents", "k", {}, {"latent": LATENT})
    blob = _one_blob(tmp_path)
    blob.write_bytes(blob.read_bytes() + b"\0")
    assert c.get("latents", "k") is None and c.corrupt == 1 and c.blob_reads == 0


def test_corrupt_read_keeps_a_record_rewritten_meanwhile(tmp_path):
    c = StageCache(tmp_path)
    c.put("latents", "k", {"v": 1}, {"latent": LATENT})
    stale = c.get("latents", "k")
    _flip_payload_byte(_one_blob(tmp_path))
    c.put("latents", "k", {"v": 2}, {"latent": LATENT * 2})  # another process recomputed it
    with pytest.raises(CorruptEntry):
        stale.tensors
    fresh = c.get("latents", "k")
    assert fresh.meta == {"v": 2} and fresh.tensors["latent"][3] == 6.0 and c.corrupt == 1


def test_unreadable_index_record_is_dropped(tmp_path, caplog):
    c = StageCache(tmp_path)
    c.index["captions/k"] = {"meta": "{}"}  # no checksum field
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        assert c.get("captions", "k") is None
    assert c.corrupt == 1 and not c.has("captions", "k") and "unreadable index record" in caplog.text


# -- exact formats and housekeeping ------------------------------------------------------------------

def test_file_digest_and_stable_hash_of_paths(tmp_path):
    from vlcp.store.cache import file_digest

    f = tmp_path / "f.bin"
    f.write_bytes(b"0123456789" * 3)
    assert file_digest(f, chunk=7) == hashlib.sha256(b"0123456789" * 3).hexdigest()
    assert stable_hash({"p": Path("a/b")}) == hashlib.sha256(b'{"p":"a/b"}').hexdigest()[:32]  # default=str


def test_atomic_write_goes_through_a_hidden_temp_file_beside_the_target(tmp_path, monkeypatch):
    import os

    from vlcp.store.cache import atomic_write_text

    moves, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moves.append((Path(a), Path(b))) or real(a, b))
    target = tmp_path / "sub" / "x.json"
    atomic_write_text(str(target), "héllo")
    assert target.read_bytes() == "héllo".encode()
    ((src, dst),) = moves
    assert dst == target and src.parent == target.parent
    assert src.name.startswith(".tmp-") and src.name.endswith(".json") and not src.exists()


def test_failed_atomic_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import os

    from vlcp.store.cache import atomic_write_bytes

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_entry_messages():
    assert str(CorruptEntry("bad")) == "bad"
    err = CorruptEntry("checksum mismatch", "latents", "0123456789abcdef")
    assert str(err) == "cache entry latents/0123456789ab is corrupt (checksum mismatch); rerun to recompute it"
    assert str(CorruptEntry("r", "s")) == "cache entry s/ is corrupt (r); rerun to recompute it"


def test_index_never_evicts_and_keeps_records_in_sqlite(tmp_path):
    c = StageCache(tmp_path / "deep" / "er")  # parents are created
    assert (c.index.eviction_policy, c.index.cull_limit) == ("none", 0)
    assert c.index.size_limit >= 1 << 62 and c.index.disk_min_file_size >= 1 << 30
    c.put("captions", "k", {"caption": "x" * 100_000})  # larger than diskcache's 32 KB default
    assert sorted(p.name for p in (tmp_path / "deep" / "er" / "index").iterdir() if not p.name.startswith("cache.db"))\
        == []


def test_blob_layout_on_disk(tmp_path):
    """Blobs written by earlier versions must stay findable: blobs/<stage>/<key[:2]>/<key>-<sha[:16]>.safetensors."""
    from safetensors.numpy import save

    c = StageCache(tmp_path)
    c.put("latents", "abcdef", {}, {"latent": LATENT})
    sha = hashlib.sha256(save({"latent": LATENT})).hexdigest()
    assert _one_blob(tmp_path) == tmp_path / "blobs" / "latents" / "ab" / f"abcdef-{sha[:16]}.safetensors"


def test_corruption_warnings_name_the_entry_and_count_each(tmp_path, caplog):
    c = StageCache(tmp_path)
    c.put("latents", "0123456789abcdef", {}, {"latent": LATENT})
    c.put("captions", "k2", {"caption": "a dog"})
    rec = c.index["captions/k2"]
    c.index["captions/k2"] = {**rec, "meta": rec["meta"].replace("dog", "cat")}
    blob = _one_blob(tmp_path)
    blob.write_bytes(blob.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        assert c.get("latents", "0123456789abcdef") is None and c.get("captions", "k2") is None
    size = blob.stat().st_size
    assert caplog.messages == [
        f"cache entry latents/0123456789ab is corrupt (blob {blob.name} has {size} bytes, expected {size + 1}); "
        "recomputing it",
        "cache entry captions/k2 is corrupt (metadata checksum mismatch); recomputing it"]
    assert c.corrupt == 2


def test_unreadable_reason_is_the_os_message(tmp_path, monkeypatch):
    c = StageCache(tmp_path)
    c.put("latents", "k", {}, {"latent": LATENT})
    blob = _one_blob(tmp_path)
    _damage("unreadable", blob, monkeypatch)
    with pytest.raises(CorruptEntry) as err:
        c.get("latents", "k").tensors
    assert err.value.reason == f"blob {blob.name} unreadable: Permission denied"


def test_blob_reads_count_every_read(tmp_path):
    c = StageCache(tmp_path)
    c.put("latents", "a", {}, {"latent": LATENT})
    c.put("latents", "b", {}, {"latent": LATENT})
    c2 = StageCache(tmp_path)
    for k in "ab":
        c2.get("latents", k).tensors
    assert c2.blob_reads == 2


def test_stats_counts_entries_bytes_and_models_not_memos(tmp_path):
    c = StageCache(tmp_path)
    c.memo("file-digest", "m1", lambda: "d")  # written first: stats must skip it and go on
    for k in ("a", "b"):
        c.put("captions", k, {"caption": "x"})  # '{"caption": "x"}': 16 bytes each
    c.put("latents", "c", {}, {"latent": LATENT})
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "w.bin").write_bytes(b"12345")
    (tmp_path / "models" / "unet.bin").write_bytes(b"12")
    assert c.stats() == {"captions": {"entries": 2, "bytes": 32},
                         "latents": {"entries": 1, "bytes": 2 + _one_blob(tmp_path).stat().st_size},
                         "models": {"entries": 2, "bytes": 7}}


def test_clear_one_stage_models_or_everything(tmp_path):
    c = StageCache(tmp_path)
    assert c.clear() == 0 and c.clear("latents") == 0 and c.clear("models") == 0  # nothing there: no error
    c.memo("file-digest", "m1", lambda: "d")
    c.put("captions", "a", {"caption": "x"})
    c.put("captions", "b", {"caption": "y"})
    c.put("latents", "c", {}, {"latent": LATENT})
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "unet.bin").write_bytes(b"12")
    assert c.clear("captions") == 2 and not c.has("captions", "a") and c.has("latents", "c")
    assert c.clear("models") == 2 and not (tmp_path / "models").exists() and c.has("latents", "c")
    assert c.clear("_memo") == 1 and c.has("latents", "c")
    (tmp_path / "models").mkdir()
    c.put("captions", "a", {"caption": "x"})
    assert c.clear() == 2 and not (tmp_path / "blobs").exists() and not (tmp_path / "models").exists()
    assert c.stats() == {}


def test_memo_computes_once_per_key(tmp_path):
    c = StageCache(tmp_path)
    calls = []
    assert c.memo("digest", "k1", lambda: calls.append(1) or "v1") == "v1"
    assert StageCache(tmp_path).memo("digest", "k1", lambda: calls.append(2) or "other") == "v1"
    assert c.memo("digest", "k2", lambda: calls.append(3) or "v2") == "v2"
    assert calls == [1, 3] and c.index["_memo/digest/k1"] == "v1"


# -- per-class streaming (issue 12): tensors read without being kept --------------------------------

def test_read_returns_tensors_without_keeping_them(tmp_path):
    c = StageCache(tmp_path)
    e = c.put("latents", "k", {"m": 1}, {"latent": LATENT}, retain=False)
    assert not e.loaded and c.blob_reads == 0  # written, not held
    assert e.read()["latent"][5] == 5.0 and not e.loaded and c.blob_reads == 1
    assert e.read()["latent"][6] == 6.0 and c.blob_reads == 2  # every read() reads the blob again
    assert e.tensors["latent"][7] == 7.0 and e.loaded and c.blob_reads == 3
    assert e.read()["latent"][8] == 8.0 and c.blob_reads == 3  # once kept, read() uses them
    kept = c.put("latents", "k2", {}, {"latent": LATENT})
    assert kept.loaded and kept.read()["latent"] is not None and c.blob_reads == 3


def test_put_many_stores_a_batch_as_put_stores_each_item(tmp_path, monkeypatch):
    """One index transaction for the batch's records (blobs written before it), the same records,
    entries and laziness as one put per item."""
    c = StageCache(tmp_path / "many")
    one = StageCache(tmp_path / "one")
    items = [("a", {"n": 1}, {"latent": LATENT}), ("b", {"n": 2}, None), ("c", {"n": 3}, {"latent": LATENT * 2})]
    opened = []
    real = c.index.transact
    monkeypatch.setattr(c.index, "transact", lambda *a, **k: opened.append(1) or real(*a, **k))
    got = c.put_many("latents", items, retain=False)
    assert opened == [1]  # one transaction for three records
    for (key, meta, tensors), e in zip(items, got):
        ref = one.put("latents", key, meta, tensors, retain=False)
        assert e.meta == ref.meta == meta and e.loaded == ref.loaded == (tensors is None)  # nothing to read back
        back = c.get("latents", key)
        assert back.meta == meta and c.has("latents", key)
        if tensors is None:
            assert back.tensors == {}
        else:
            np.testing.assert_array_equal(back.tensors["latent"], tensors["latent"])
            np.testing.assert_array_equal(e.read()["latent"], tensors["latent"])
    kept = c.put_many("latents", [("d", {}, {"latent": LATENT})])
    assert kept[0].loaded and c.put_many("latents", []) == []


def test_read_of_a_corrupt_blob_raises_and_drops_the_record(tmp_path):
    c = StageCache(tmp_path)
    e = c.put("latents", "k", {}, {"latent": LATENT}, retain=False)
    _flip_payload_byte(_one_blob(tmp_path))
    with pytest.raises(CorruptEntry, match=r"^cache entry latents/k is corrupt \(checksum mismatch in k-"):
        e.read()
    assert not c.has("latents", "k") and c.corrupt == 1


def test_run_items_without_retain_keeps_no_computed_tensor(tmp_path):
    from vlcp.store.runner import ItemOpts

    c = StageCache(tmp_path)
    keys = ["a", "b", "a", "c"]

    def compute(idx):
        return (({"i": i}, {"latent": np.full(3, i, np.float32)}) for i in idx)

    entries, rep = run_items(c, "latents", keys, compute, 2, progress=False, opts=ItemOpts(retain=False))
    assert rep.items_computed == 3 and not any(e.loaded for e in entries) and c.blob_reads == 0
    assert [e.read()["latent"][0] for e in entries] == [0.0, 1.0, 0.0, 3.0] and c.blob_reads == 4
    entries, _ = run_items(c, "latents", ["d"], compute, 2, progress=False)  # default: kept
    assert entries[0].loaded


def test_get_many_is_get_for_each_key(tmp_path, monkeypatch, caplog):
    """One SQL query per chunk of keys: the same entries as one get per key, missing and corrupt ones None
    (a corrupt one dropped and counted), and the same without diskcache's table (the fallback)."""
    c = StageCache(tmp_path)
    for k in "abcde":
        c.put("latents", k, {"k": k}, {"latent": LATENT * ord(k)})
    c.put("captions", "a", {"caption": "not a latent"})
    rec = c.index["latents/d"]
    c.index["latents/d"] = {**rec, "meta": rec["meta"].replace('"d"', '"x"')}  # metadata no longer matches
    keys = ["e", "a", "zz", "d", "c", "b"]
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        got = StageCache(tmp_path).get_many("latents", keys, chunk=2)
    assert [e and e.meta["k"] for e in got] == ["e", "a", None, None, "c", "b"]
    assert not any(e.loaded for e in got if e) and got[1].tensors["latent"][1] == 97.0
    assert "latents/d" not in c.index and "metadata checksum mismatch" in caplog.text
    monkeypatch.setattr("vlcp.store.cache.diskcache_major", lambda: 6)  # another schema: one get per key
    fresh = StageCache(tmp_path)
    assert [e and e.meta["k"] for e in fresh.get_many("latents", keys)] == ["e", "a", None, None, "c", "b"]
    assert StageCache(tmp_path).get_many("latents", []) == []


@pytest.mark.e2e
def test_clustering_reads_one_class_at_a_time_and_keeps_no_latent(tmp_path, cache_dir, monkeypatch):
    """A cold --until clusters: the latents stage keeps none of the latents it computed; outliers and clusters
    read each latent (of the inliers) exactly once, never more than one class's latents alive at a time
    (counted through weak references to every array read), none kept afterwards; the result is the LOF
    and K-Means of each class's stacked latents, as computed directly."""
    import gc
    import weakref

    from vlcp.method import clusters as clusters_mod
    from vlcp.method import outliers as outliers_mod
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import _run_stages, start
    from vlcp.store.arrays import array_hash

    live, peak = [0], [0]
    real_read = StageCache._read_blob

    def counted_read(self, stage, key, name, sha):
        out = real_read(self, stage, key, name, sha)
        for arr in out.values():
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(arr, lambda: live.__setitem__(0, live[0] - 1))
        return out

    monkeypatch.setattr(StageCache, "_read_blob", counted_read)
    cfg = DistillConfig(data="digits", ipc=2, out=tmp_path / "out", data_dir=tmp_path / "data", tiny=True,
                        classes=["0", "1", "2", "3"], max_per_class=9, until="clusters", finetune=False,
                        contamination=0.2, progress=False)
    cache = StageCache(cache_dir)
    run = start(cfg, cache)
    _run_stages(run)
    st = run.st
    gc.collect()
    n, inliers = len(st.samples), sum(len(r) for r in st.inliers)
    assert n == 36 and inliers < n  # LOF removed some
    assert cache.blob_reads == n + inliers  # outliers read every latent once, clusters every inlier once
    assert not any(e.loaded for e in st.lat_entries) and live[0] == 0
    assert not any(e.loaded for e in st.clusters.values())  # one entry per class, its centres not kept
    assert peak[0] == 9  # one class at a time (9 images per class), never two
    for c, f in enumerate(run.folders):
        x = np.stack([cache.get("latents", st.lat_keys[i]).tensors["latent"] for i in st.by_class[c]])
        mask, _ = outliers_mod.inlier_mask(x, 0.2, 2)
        assert st.inliers[c] == [st.by_class[c][j] for j in np.flatnonzero(mask)]
        centres, members, _ = clusters_mod.class_clusters(x[mask], st.inliers[c], 2, cfg.seed, False)
        assert st.clusters[f].meta["members"] == members
        assert np.array_equal(st.clusters[f].read()["centres"], centres)
        assert st.clusters[f].meta["hashes"]["centres"] == [array_hash(z) for z in centres]


def _row(c: StageCache, k: str):
    return c.index._sql("SELECT mode, value FROM Cache WHERE key = ?", (k,)).fetchone()


def _set_row(c: StageCache, k: str, mode: int, value: bytes) -> None:
    import sqlite3

    c.index._sql("UPDATE Cache SET mode = ?, value = ? WHERE key = ?", (mode, sqlite3.Binary(value), k))


class _RunsCode:
    """What a pickle from elsewhere could hold: unpickling it would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_index_records_are_json_not_pickles(tmp_path):
    c = StageCache(tmp_path)
    c.put("latents", "k1", {"note": "x"}, {"latent": LATENT})
    c.index.set("_memo/n/k", 5)
    mode, value = _row(c, "latents/k1")
    rec = json.loads(bytes(value))  # the whole record is JSON text
    assert rec["meta"] == '{"note": "x"}' and rec["blob"].startswith("k1-") and bytes(value)[:1] == b"{"
    assert _row(c, "_memo/n/k") == (1, 5)  # numbers (and strings) stay raw, as diskcache stores them


def test_a_pickle_in_the_index_is_never_run_and_is_dropped(tmp_path, caplog):
    """A tampered index (a pickle that would create a file when unpickled): no code runs; stats, get and
    get_many each drop such a row with a warning naming it, and the stage can store the item again."""
    marker = tmp_path / "ran"
    evil = pickle.dumps({"meta": _RunsCode(marker)}, protocol=5)

    def poisoned(*keys):
        c = StageCache(tmp_path)
        for k in keys:
            c.put("latents", k, {"k": k}, {"latent": LATENT})
            _set_row(c, f"latents/{k}", _row(c, f"latents/{k}")[0], evil)
        return StageCache(tmp_path)

    def warned(c, key):
        return caplog.records[-1].getMessage() == (
            f"cache entry latents/{key[:12]} is corrupt (unreadable index value: refusing builtins.exec: "
            "the index holds plain data only); recomputing it")

    a, b, d = "a" * 20, "b" * 20, "d" * 20
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        c = StageCache(tmp_path)
        c.put("latents", "c" * 20, {"k": "c"}, {"latent": LATENT})
        c = poisoned(a, "e" * 20)
        assert c.stats()["latents"]["entries"] == 1 and warned(c, "e" * 20)  # the rows after them still count
        assert c.corrupt == 2
        c = poisoned(b)
        assert c.get("latents", b) is None and warned(c, b) and c.corrupt == 1
        c = poisoned(d)
        assert c.get_many("latents", [d, "c" * 20])[0] is None and warned(c, d) and c.corrupt == 1
    assert not marker.exists() and not any(c.has("latents", k) for k in (a, b, d))
    assert c.get("latents", "c" * 20).meta == {"k": "c"}
    c.put("latents", a, {"k": a}, {"latent": LATENT})
    assert c.get("latents", a).meta == {"k": a}


def test_index_rows_vlcp_never_writes_are_refused_with_the_reason(tmp_path, caplog):
    c = StageCache(tmp_path)
    c.put("latents", "k" * 20, {}, {"latent": LATENT})
    c.index._sql("UPDATE Cache SET mode = 4, filename = 'x', value = NULL")  # a value kept in a file
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        assert c.get("latents", "k" * 20) is None
    assert caplog.records[-1].getMessage() == (f"cache entry latents/{'k' * 12} is corrupt (index value in a "
                                               "separate file: not written by vlcp); recomputing it")
    c.put("latents", "k" * 20, {}, {"latent": LATENT})
    c.index._sql("UPDATE Cache SET raw = 0")  # a pickled key
    with pytest.raises(ValueError, match="^pickled index key: not written by vlcp$"):
        list(c.index.iterkeys())


def test_records_pickled_by_earlier_versions_are_still_read(tmp_path):
    """Caches written before the index was JSON hold pickled dicts: read as plain data, nothing recomputed."""
    c = StageCache(tmp_path)
    c.put("latents", "k1", {"note": "x", "n": [1, 2]}, {"latent": LATENT})
    mode, value = _row(c, "latents/k1")
    _set_row(c, "latents/k1", mode, pickle.dumps(json.loads(bytes(value)), protocol=5))
    c = StageCache(tmp_path)
    e = c.get("latents", "k1")
    assert e.meta == {"note": "x", "n": [1, 2]} and np.array_equal(e.tensors["latent"], LATENT) and c.corrupt == 0
    assert c.stats()["latents"]["entries"] == 1 and c.clear("latents") == 1
