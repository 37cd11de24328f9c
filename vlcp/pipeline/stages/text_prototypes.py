"""Stage ``text_prototypes`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def text_prototypes(run: Run, step: Step) -> None:
    """Algorithm 2 per class: non-representative words N, top-k words R_w, the best member caption."""
    from vlcp.method import text_prototypes as tp
    from vlcp.method.text_prototypes_reference import class_prototypes_reference

    p, st = step.p, run.st
    run.need("text_prototypes", st.captions)
    st.tp_key = step.key(clusters=st.cl_key, names=[c.name for c in run.ds.classes], captions={
        f: stable_hash([[st.cap_keys[i], st.samples[i].source] for i in st.inliers[c]])
        for c, f in enumerate(run.folders)})

    def compute():
        meta = {}
        for c, f in enumerate(run.folders):
            rows = st.inliers[c]
            pos = {g: j for j, g in enumerate(rows)}
            members = [[pos[g] for g in m] for m in st.clusters[f].meta["members"]]
            pick = class_prototypes_reference if p.text_prototypes == "reference" else tp.class_prototypes
            recs = pick([st.captions[g] for g in rows], members, run.ds.classes[c].name, p.beta, p.top_k,
                        clean_captions=p.clean_captions)
            for r, m in zip(recs, members):
                r["mode"] = p.text_prototypes
                r["member"] = st.samples[rows[r["member"]]].source if r["member"] is not None else None
                r["cluster_size"] = len(m)
            meta[f] = recs
        return meta, {}

    entry, _ = step.whole(st.tp_key, compute)
    st.text = entry.meta
    run.files["prototypes.json"] = {"mode": p.text_prototypes, "beta": p.beta, "top_k": p.top_k, "classes": {
        f: {"name": run.ds.classes[c].name, "clusters": st.text[f]} for c, f in enumerate(run.folders)}}
    run.manifest["text_prototypes"] = {f: [{k: r[k] for k in ("caption", "score", "fallback", "representative_words",
                                                                "non_representative")} for r in recs]
                                       for f, recs in st.text.items()}
