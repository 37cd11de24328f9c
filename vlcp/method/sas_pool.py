"""After SAS has ranked a pool: class centroids (anchors), the next-ranked unpicked candidate, and the
walk refinement takes through a prototype's pool before generating new candidates (vlcp's formulation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcp.method.sas import SasError, Selection


def centroids(emb: np.ndarray, labels, n_classes: int) -> np.ndarray:
    """[C, d] unit mean embedding per class: the image-space anchor (real images' class centroids)."""
    emb, labels = np.asarray(emb, np.float32), np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    if len(counts) > n_classes or (counts == 0).any():
        raise SasError(f"every class needs at least one image for its centroid; empty: "
                       f"{np.nonzero(counts[:n_classes] == 0)[0].tolist()}")
    sums = np.zeros((n_classes, emb.shape[1]), np.float64)
    np.add.at(sums, labels, emb)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def next_ranked(sel: Selection, candidate: int, taken=()) -> int | None:
    """The best-ranked unpicked candidate (not in ``taken``) of ``candidate``'s class, and of its prototype
    when prototypes are known: what replaces a pick found defective later (e.g. by the detector).
    Ranks put stage-1 candidates before dropped ones; None when the pool is used up."""
    return _next_ranked(PoolRanks(sel.labels, sel.prototypes, sel.rank, sel.kept), candidate, taken)


@dataclass(frozen=True)
class PoolRanks:
    """What a replacement walk needs of a selection, per candidate (from a Selection or its manifest records)."""
    labels: np.ndarray
    prototypes: np.ndarray | None
    rank: np.ndarray
    kept: np.ndarray

    @classmethod
    def of_records(cls, records: list[dict]) -> "PoolRanks":
        protos = [r["prototype"] for r in records]
        return cls(np.array([r["class"] for r in records], np.int64),
                   None if None in protos else np.array(protos, np.int64),
                   np.array([r["rank"] for r in records], np.int64), np.array([r["kept"] for r in records], bool))

    def reachable(self, candidate: int) -> list[int]:
        """The unpicked candidates a walk from ``candidate`` may visit: same class (and prototype)."""
        same = (self.labels == self.labels[candidate]) & ~self.kept
        if self.prototypes is not None:
            same &= self.prototypes == self.prototypes[candidate]
        return np.nonzero(same)[0].tolist()


def _next_ranked(pr: PoolRanks, candidate: int, taken=()) -> int | None:
    idx = [k for k in pr.reachable(candidate) if k not in set(taken)]
    return int(idx[int(np.argmin(pr.rank[idx]))]) if idx else None  # argmin: the lowest index on equal ranks


def pool_walk(pr: PoolRanks, picks: list[int], bad) -> list[tuple[int | None, list[int]]]:
    """Replacements from the pool (vlcp's composition of SAS with refinement): for each defective pick in
    order, the unpicked candidates of its prototype in rank order; the first not in ``bad`` replaces it.
    A candidate is visited once in the whole walk (a good one is used, a bad one stays bad), so none is
    used twice. Per pick: (its replacement or None when the prototype's pool is used up, the visited)."""
    taken: set[int] = set()
    out = []
    for pick in picks:
        visited, found = [], None
        while found is None and (k := _next_ranked(pr, pick, taken)) is not None:
            taken.add(k)
            visited.append(k)
            found = None if k in bad else k
        out.append((found, visited))
    return out
