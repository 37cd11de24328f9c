"""Stage ``images`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def images(run: Run, step: Step) -> None:
    """Decode each file once (cached per content hash); drop the unreadable ones."""
    from vlcp.data.datasets import DatasetError, check_image
    from vlcp.data.images import shown_path, without_paths

    ds = run.ds
    keys = [step.key(image=s.digest) for s in ds.samples]
    entries, rep = step.items(keys, lambda idx: ((check_image(ds.samples[i]), None) for i in idx), 64)
    ok = [e is None or e.meta["ok"] for e in entries]  # a dry run assumes unchecked images are fine
    # the error as PIL words it quotes the file's absolute path: cut to its name (publish hides whole paths only)
    skipped = [{"source": s.source, "error": without_paths(e.meta["error"])}
               for s, e, k in zip(ds.samples, entries, ok) if not k]
    run.st.samples = [s for s, k in zip(ds.samples, ok) if k]
    run.st.by_class = [[] for _ in ds.classes]  # one pass: a scan per class is quadratic at 1000 classes
    for i, s in enumerate(run.st.samples):
        run.st.by_class[s.class_idx].append(i)
    rep.details = {**rep.details, "skipped": len(skipped)}
    run.manifest["skipped_images"] = skipped
    if skipped:
        first, error = skipped[0]["source"], skipped[0]["error"]
        run.warn(f"skipped {len(skipped)} unreadable image(s) in the dataset folder, e.g. "
                 f"{shown_path(first, ds.root)}: {error.removeprefix(Path(first).name + ': ')}")
    for c, idx in enumerate(run.st.by_class):
        if not idx:
            raise DatasetError(f"class {ds.classes[c].folder!r} has no usable images")
    _enough_for_ipc(run)
    run.manifest["images_per_class"] = {f: len(idx) for f, idx in zip(run.folders, run.st.by_class)}


def _enough_for_ipc(run: Run) -> None:
    """A class with fewer usable images than IPC stops the clusters stage; say so here, before the hours of
    captions and latents (and in a dry run), with the clusters stage's own words. A check, not an input: it
    reads the config, not the stage's keyed parameters."""
    if run.cfg.allow_duplicates or "clusters" not in run.todo:
        return
    for c, idx in enumerate(run.st.by_class):
        if len(idx) < run.cfg.ipc:
            raise too_few(run, c, len(idx))


def too_few(run: Run, c: int, n: int):
    """The error of class ``c`` with ``n`` usable images, fewer than IPC (here and in the clusters stage),
    naming --max-per-class where that cap is what limits it."""
    from vlcp.pipeline.run import DistillError

    p = run.cfg
    capped = p.max_per_class is not None and n == p.max_per_class
    how = f"raise --max-per-class {p.max_per_class}, lower --ipc" if capped else "lower --ipc"
    return DistillError(f"class {run.folders[c]!r} ({run.ds.classes[c].name}) has {n} usable images"
                        f"{' (--max-per-class)' if capped else ''}, fewer than --ipc {p.ipc}; {how} or pass "
                        f"--allow-duplicates")
