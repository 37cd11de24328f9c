"""Post-sampling's centroid anchors: the CLIP class centroids of the real images (``--sas-anchor centroid``
of ``vlcp distill``, ``--anchor centroid`` of ``vlcp select``), embeddings cached per image content."""
from __future__ import annotations

import numpy as np

from vlcp.method import sas, sas_pool
from vlcp.models import clip
from vlcp.store.cache import StageCache


def real_centroids(cache: StageCache, ref, ds, model, batch_size: int = 64, progress: bool = False):
    """([C, d] CLIP class centroids of the real images, StageReport, images used per class).

    Embeddings are cached per image content digest and CLIP identity; unreadable images are left out."""
    from vlcp.data.images import BadImage

    def load(i: int) -> np.ndarray | None:
        try:
            return np.asarray(ds.samples[i].load())
        except BadImage:
            return None

    emb, rep = clip.cached_image_embeddings(cache, ref, [s.digest for s in ds.samples], load, model, batch_size,
                                            "clip real" if progress else False)
    ok = np.isfinite(emb).all(axis=1)
    labels = np.array([s.class_idx for s in ds.samples], np.int64)
    try:
        anchors = sas_pool.centroids(emb[ok], labels[ok], len(ds.classes))
    except sas.SasError as exc:
        raise sas.SasError(f"--anchor centroid: {exc}") from None
    return anchors, rep, np.bincount(labels[ok], minlength=len(ds.classes)).tolist()
