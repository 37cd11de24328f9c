"""Stage ``output`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def output(run: Run, step: Step) -> None:
    """``OUT/train`` (the images and their metadata.jsonl), the contact sheets: rebuilt from the cache on every
    run (cheap, never stale). Each image's prompt, cluster and cluster size come from ``prototypes.json`` and the
    manifest as they are when OUT is written (after post-sampling and refinement), read as ``vlcp evaluate
    --caption-fusion`` reads a folder written before metadata.jsonl existed."""
    from vlcp.store import output as out
    from vlcp.store.runner import StageReport

    p, st, classes = step.p, run.st, run.ds.classes
    images: dict[int, list[int]] = {}  # class -> indices into st.images: each image is read when written
    for i, (c, _) in enumerate(st.items):
        images.setdefault(c, []).append(i)
    by_class = {c: st.images.pick(idx) for c, idx in images.items()}
    replaced = sorted(st.replaced)
    pairs = ((st.replaced[i].get(), st.images[i], classes[st.items[i][0]].name) for i in replaced)

    def write(tmp):
        sheet = out.ContactSheet(classes, max((len(v) for v in by_class.values()), default=1))
        extra = out.prototype_records(run.files.get("prototypes.json"), run.manifest)
        out.save_images(tmp, classes, by_class, p.image_size, sheet, extra)  # each image read once, for both
        sheet.image.save(tmp / "preview.png")
        if replaced:
            out.before_after_sheet(pairs, len(replaced)).save(tmp / "preview_refined.png")

    run.writers.append(write)
    run.reports.append(StageReport("output", step.key(images=st.syn_keys), False, len(st.items), 0, False, 0.0))
