"""Stage ``clusters`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vlcp.method import clusters as clusters_mod

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def clusters(run: Run, step: Step) -> None:
    """K-Means per class (k = IPC, n_init 10, --seed); the centres are the image prototypes. One entry per
    class, not kept in memory: the peak is one class's latents whatever the number of classes."""
    from vlcp.pipeline.stages import masks as ms
    from vlcp.pipeline.stages.images import too_few
    from vlcp.store.arrays import array_hash

    p, st = step.p, run.st
    keys = [step.key(outliers=st.out_key, folder=f) for f in run.folders]
    st.cl_key = step.key(outliers=st.out_key)  # all classes' clusters (what text prototypes are keyed by)

    def compute(idx):
        for c in idx:
            rows = st.inliers[c]
            try:
                centres, members, dup = clusters_mod.class_clusters(ms.features(run, rows, c, p.object_masks), rows,
                                                                    p.ipc, p.seed, p.allow_duplicates)
            except clusters_mod.TooFewImages:
                raise too_few(run, c, len(rows)) from None
            if p.object_masks:
                centres = ms.unmasked_centres(run, members)
            yield ({"members": members, "sizes": [len(m) for m in members], "duplicated": dup,
                    "hashes": {"centres": [array_hash(z) for z in centres]}}, {"centres": centres})

    entries, _ = step.items(keys, compute, 1, retain=False)
    run.need("text_prototypes", entries)
    st.clusters = dict(zip(run.folders, entries))
    ms.record_clusters(run)
    for f, e in st.clusters.items():
        if e.meta["duplicated"]:
            run.warn(f"class {f}: fewer images than --ipc; prototypes repeat (--allow-duplicates)")
