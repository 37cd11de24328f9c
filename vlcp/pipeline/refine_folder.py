"""``vlcp refine`` on a folder vlcp did not write: judge every image with the ``detector`` stage's detector
(same key, same cache as ``vlcp distill --refine``) and write a report; nothing can be replaced."""
from __future__ import annotations

import numpy as np

from vlcp.method.refine import is_defective, scores_of


def detect_only(folder, cfg, cache) -> dict:
    """Judge every image of a foreign ImageFolder and write ``cfg.out``/report.json (no replacement possible).

    The detector comes from the same ``detector`` stage as ``vlcp distill --refine`` (same key, same cache)."""
    from pathlib import Path

    from vlcp import __version__
    from vlcp.evaluation.samples import synthetic_samples
    from vlcp.pipeline.stages.refinement import standalone_detector
    from vlcp.store.output import publish, write_json

    det, net, ds = standalone_detector(cfg, cache)
    p, beta = det.protocol, cfg.refine_beta
    samples, _ = synthetic_samples(Path(folder), ds, None)
    images = [np.asarray(s.load()) for s in samples]
    scores = []
    for i in range(0, len(images), 64):
        scores += scores_of(net, images[i:i + 64], p, det.device())
    rows, per_class = [], {}
    for s, sc in zip(samples, scores):
        c = s.class_idx
        d = is_defective(sc["pred"], sc["probs"][c], c, beta)
        rows.append({"file": s.source, "class": ds.classes[c].folder, "predicted": ds.classes[sc["pred"]].folder,
                     "p_target": sc["probs"][c], "defective": d})
        st = per_class.setdefault(ds.classes[c].folder, {"images": 0, "defective": 0, "confidence": 0.0})
        st["images"] += 1
        st["defective"] += d
        st["confidence"] += sc["probs"][c]
    for st in per_class.values():
        st["confidence"] = round(st["confidence"] / st["images"], 4)
    report = {"vlcp_version": __version__, "folder": str(folder), "mode": "detection only (not a vlcp distill output)",
              "beta": beta, "detector": det.entry.meta, "per_class": per_class, "images": rows}
    publish(Path(cfg.out), lambda tmp: write_json(tmp / "report.json", report))
    return report
