"""Stage ``outliers`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlcp.method import outliers as outliers_mod
from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def outliers(run: Run, step: Step) -> None:
    """LOF per class; a class keeps at least IPC images (the least outlying outliers come back)."""
    p, st = step.p, run.st
    from vlcp.pipeline.stages import masks as ms

    run.need("outliers", st.lat_entries)
    st.out_key = step.key(latents={f: stable_hash([st.lat_keys[i] for i in st.by_class[c]])
                                   for c, f in enumerate(run.folders)}, n_neighbors=outliers_mod.N_NEIGHBORS,
                          **ms.key_part(run, p.object_masks))
    entry, rep = step.whole(st.out_key, lambda: outliers_mod.per_class(  # foreground-weighted with --object-masks
        ((f, ms.features(run, st.by_class[c], c, p.object_masks)) for c, f in enumerate(run.folders)),
        p.contamination, p.ipc))  # a generator: one class's latents in memory at a time
    rep.details = {**rep.details, "removed_per_class": {f: m["removed"] for f, m in entry.meta.items()}}
    run.manifest["outliers"] = entry.meta
    for f, m in entry.meta.items():
        if m["restored"]:
            run.warn(f"class {f}: LOF would leave fewer than IPC={p.ipc} inliers; kept {m['restored']} of "
                     f"the least outlying outliers")
    st.inliers = [[st.by_class[c][j] for j in np.flatnonzero(entry.tensors[f"mask/{f}"])]
                  for c, f in enumerate(run.folders)]
