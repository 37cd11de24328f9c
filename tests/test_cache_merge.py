"""`vlcp cache merge SRC`: per-node caches folded into one (vlcp/store/merge.py)."""
import shutil

import numpy as np
import pytest

from tests.conftest import read_manifest
from vlcp.store.cache import StageCache
from vlcp.store.merge import CacheMergeError, merge


def test_merge_copies_what_is_missing_and_checks_blobs(tmp_path):
    a, b = StageCache(tmp_path / "a"), StageCache(tmp_path / "b")
    a.put("latents", "k1", {}, {"latent": np.full(3, 1.0, np.float32)})
    b.put("latents", "k1", {}, {"latent": np.full(3, 1.0, np.float32)})
    b.put("latents", "k2", {}, {"latent": np.full(3, 2.0, np.float32)})
    b.put("captions", "c1", {"caption": "a dog"})
    bad = b.put("latents", "k3", {}, {"latent": np.full(3, 3.0, np.float32)}) and b.index.get("latents/k3")
    path = b._blob_path("latents", bad["blob"])
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # same size, wrong checksum
    b.index.set("_alive/L/0", 7)  # process-local records stay behind
    b.close()

    rep = merge(a, tmp_path / "b")
    assert (rep.copied, rep.present, rep.corrupt) == (2, 1, 1)
    assert a.get("latents", "k2").tensors["latent"].tolist() == [2.0, 2.0, 2.0]
    assert a.get("captions", "c1").meta == {"caption": "a dog"}
    assert not a.has("latents", "k3") and "_alive/L/0" not in a.index
    again = merge(a, tmp_path / "b")  # idempotent: a rerun after an interruption just finishes the job
    assert (again.copied, again.present, again.corrupt) == (0, 3, 1)


def test_merge_refuses_what_is_not_a_cache(tmp_path):
    a = StageCache(tmp_path / "a")
    with pytest.raises(CacheMergeError, match=r"nope is not a vlcp cache directory \(no index/ folder\)$"):
        merge(a, tmp_path / "nope")
    with pytest.raises(CacheMergeError, match="is this cache itself"):
        merge(a, tmp_path / "a")
    assert not (tmp_path / "nope").exists()


@pytest.mark.e2e
def test_two_nodes_two_caches_one_merge(tmp_path, tiny_models_dir, vlcp):
    """Node A distils classes 0,1, node B class 2, each into its own cache; merged, the full run is cached."""
    caches = {}
    for node, classes in (("a", "0,1"), ("b", "2")):
        caches[node] = tmp_path / node
        shutil.copytree(tiny_models_dir, caches[node] / "models")
        res = vlcp("distill", "--data", "digits", "--tiny", "--classes", classes, "--max-per-class", "4", "--ipc", "1",
                   "--until", "latents", "--no-finetune", "--out", tmp_path / f"out-{node}", cache=caches[node])
        assert res.exit_code == 0, res.output
    res = vlcp("cache", "merge", caches["b"], cache=caches["a"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("merged 12 entries (") and "from" in res.output  # images, captions, latents x 4
    res = vlcp("distill", "--data", "digits", "--tiny", "--classes", "0,1,2", "--max-per-class", "4", "--ipc", "1",
               "--until", "latents", "--no-finetune", "--out", tmp_path / "all", cache=caches["a"])
    assert res.exit_code == 0, res.output
    stages = read_manifest(tmp_path / "all")["stages"]
    assert [(stages[s]["items_computed"], stages[s]["items_cached"]) for s in ("images", "captions", "latents")] \
        == [(0, 12)] * 3
    res = vlcp("cache", "merge", tmp_path / "missing", cache=caches["a"])
    assert res.exit_code == 2 and "is not a vlcp cache directory" in res.output.splitlines()[-1]
