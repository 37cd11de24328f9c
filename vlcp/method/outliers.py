"""Stage ``outliers``: Local Outlier Factor per class on the flattened latents (paper, section 3.2)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

VERSION = 1
N_NEIGHBORS = 10


def inlier_mask(x: np.ndarray, contamination: float, min_keep: int = 0) -> tuple[np.ndarray, int]:
    """Boolean inlier mask and how many outliers were put back to reach ``min_keep``.

    ``contamination == 0`` skips LOF (the reference scripts do this for CIFAR-10). If LOF would leave
    fewer than ``min_keep`` (= IPC) inliers, the least outlying outliers (highest LOF score) are
    restored until ``min_keep`` images remain, so clustering still has one image per prototype.
    """
    n = len(x)
    if contamination == 0 or n < 3:
        return np.ones(n, bool), 0
    from sklearn.neighbors import LocalOutlierFactor

    lof = LocalOutlierFactor(n_neighbors=min(N_NEIGHBORS, n - 1), contamination=contamination)
    mask = lof.fit_predict(x.reshape(n, -1)) == 1
    restored = 0
    if mask.sum() < min_keep:
        order = np.argsort(-lof.negative_outlier_factor_, kind="stable")  # most normal first
        for i in order:
            if mask.sum() >= min_keep:
                break
            if not mask[i]:
                mask[i] = True
                restored += 1
    return mask, restored


def per_class(latents: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], contamination: float,
              min_keep: int) -> tuple[dict, dict]:
    """LOF for each class: (meta per class: images / removed / restored, tensors: ``mask/<class>``).

    ``latents`` may be a generator of (class, latents) pairs: each class's matrix is then built when
    its turn comes and dropped after it, so memory holds one class at a time."""
    meta, tensors = {}, {}
    for folder, x in (latents.items() if isinstance(latents, Mapping) else latents):
        mask, restored = inlier_mask(x, contamination, min_keep)
        tensors[f"mask/{folder}"] = mask.astype(np.uint8)
        meta[folder] = {"images": len(mask), "removed": int((~mask).sum()), "restored": restored}
    return meta, tensors
