"""Stage ``clusters``: K-Means per class on the inlier latents; centres are the image prototypes (3.3.1)."""
from __future__ import annotations

import numpy as np

VERSION = 1


class TooFewImages(Exception):
    pass


def kmeans(x: np.ndarray, k: int, seed: int, allow_duplicates: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """(centres shaped like the inputs, cluster label per row, duplicated?).

    With fewer rows than ``k`` and ``allow_duplicates``, every image is its own prototype and the
    prototypes are reused cyclically (image i -> prototype i mod n); each synthetic image still gets
    its own seed, so the copies differ.
    """
    n = len(x)
    flat = x.reshape(n, -1).astype(np.float64)
    if n < k:
        if not allow_duplicates:
            raise TooFewImages(f"{n} images for {k} prototypes")
        centres = np.stack([x[i % n] for i in range(k)])
        return centres.astype(np.float32), np.arange(n), True
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(flat)
    return km.cluster_centers_.reshape((k,) + x.shape[1:]).astype(np.float32), km.labels_.astype(np.int64), False


def members_by_distance(x: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """For each cluster, its member rows sorted from closest to farthest from the centre (stable)."""
    flat, cflat = x.reshape(len(x), -1), centres.reshape(len(centres), -1)
    out = []
    for c in range(len(centres)):
        idx = np.flatnonzero(labels == c)
        d = np.linalg.norm(flat[idx] - cflat[c], axis=1)
        out.append([int(i) for i in idx[np.argsort(d, kind="stable")]])
    return out


def class_clusters(x: np.ndarray, rows: list[int], k: int, seed: int, allow_duplicates: bool
                   ) -> tuple[np.ndarray, list[list[int]], bool]:
    """K-Means of one class's inlier latents ``x`` (dataset indices ``rows``): (centres, member dataset
    indices per cluster, closest to the centre first, duplicated?). Raises TooFewImages."""
    centres, labels, dup = kmeans(x, k, seed, allow_duplicates)
    if dup:
        return centres, [[rows[j % len(rows)]] for j in range(k)], True
    return centres, [[rows[j] for j in m] for m in members_by_distance(x, centres, labels)], False
