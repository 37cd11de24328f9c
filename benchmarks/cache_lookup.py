"""Micro-benchmark: cost of a cached per-item lookup (issue 12, "cheap existence checks").

Fills a fresh cache with N items (one small latent each), then times a fully cached ``run_items``
over them in a new ``StageCache`` (a rerun's view): as the runner does (``get_many``: one SQL query per
500 keys, one stat per blob, no blob read), one ``get`` per key (the runner before), the cost of
hashing one stage key, and with every blob read and verified (``get(verify=True)``).

    python benchmarks/cache_lookup.py --items 10000
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from vlcp.store.cache import StageCache, stage_key
from vlcp.store.runner import run_items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64], help="latent shape (SD at 512 px)")
    args = ap.parse_args()
    keys = [f"item{i:07d}" for i in range(args.items)]
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        c = StageCache(root)
        rng = np.random.default_rng(0)
        lat = rng.normal(size=args.shape).astype(np.float32)
        for k in keys:
            c.put("latents", k, {"k": k}, {"latent": lat})
        c.close()
        fill = time.perf_counter() - t0

        c = StageCache(root)
        t0 = time.perf_counter()
        entries, rep = run_items(c, "latents", keys, lambda idx: iter(()), 64, progress=False)
        lazy = time.perf_counter() - t0
        assert rep.items_cached == len(keys) and c.blob_reads == 0

        c = StageCache(root)
        t0 = time.perf_counter()
        assert all(c.get("latents", k) is not None for k in keys)
        one_by_one = time.perf_counter() - t0
        assert c.blob_reads == 0

        c = StageCache(root)
        t0 = time.perf_counter()
        hashed = [stage_key("latents", 1, image=k, vae="tiny@0", resolution=32) for k in keys]
        hashing = time.perf_counter() - t0
        assert len(set(hashed)) == len(keys)

        c = StageCache(root)
        t0 = time.perf_counter()
        for k in keys:
            c.get("latents", k, verify=True)
        eager = time.perf_counter() - t0
        assert c.blob_reads == len(keys)
    n = len(keys)
    print(f"{n} items of {lat.nbytes} bytes: fill {fill:.1f} s")
    print(f"cached run_items (one query per 500 keys, index + stat): {lazy / n * 1e6:7.1f} us/item  ({lazy:.2f} s)")
    print(f"StageCache.get per key (index + stat):   {one_by_one / n * 1e6:7.1f} us/item  ({one_by_one:.2f} s)")
    print(f"stage_key per item (the key's hash):     {hashing / n * 1e6:7.1f} us/item  ({hashing:.2f} s)")
    print(f"get(verify=True), blob read and checked: {eager / n * 1e6:7.1f} us/item  ({eager:.2f} s)")


if __name__ == "__main__":
    main()
