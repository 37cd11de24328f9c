"""Speed of the SAS selection (vlcp's formulation of SAS from its abstract): 10 of 50 candidates for 1000 classes.

Random unit embeddings (dim 512) and 1000 random unit class anchors; times the whole selection (scores
against every class, stage 1, greedy stage 2) and, separately, building the manifest records. The
issue's bar: under a second on 2 cores. Run: ``nice -n 10 python benchmarks/sas_select.py``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from vlcp.method import sas


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=50)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    emb = unit(rng, a.classes * a.pool, a.dim)
    anchors = unit(rng, a.classes, a.dim)
    labels = np.repeat(np.arange(a.classes), a.pool)
    prototypes = np.tile(np.repeat(np.arange(a.ipc), a.pool // a.ipc), a.classes)
    rows = []
    for name, params, protos in (("sas", sas.SasParams(a.ipc), None),
                                 ("sas --sas-per-prototype", sas.SasParams(a.ipc, per_prototype=True), prototypes),
                                 ("relevance", sas.SasParams(a.ipc, mode="relevance"), None),
                                 ("random", sas.SasParams(a.ipc, mode="random"), None)):
        best, sel = float("inf"), None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            sel = sas.select(emb, labels, anchors, params, prototypes=protos)
            best = min(best, time.perf_counter() - t0)
        assert all(len(v) == a.ipc for v in sel.picked.values()) and len(sel.picked) == a.classes
        t0 = time.perf_counter()
        sel.records()
        rows.append((name, best, time.perf_counter() - t0))
    print(f"select {a.ipc} of {a.pool} candidates x {a.classes} classes, dim {a.dim} "
          f"(best of {a.repeats})")
    print(f"{'mode':<26}{'selection s':>12}{'records s':>11}")
    for name, t, r in rows:
        print(f"{name:<26}{t:>12.3f}{r:>11.3f}")


if __name__ == "__main__":
    main()
