"""``vlcp select``: the SAS post-sampling selection on any ImageFolder pool (Minimax, D4M, vlcp, ...).

The selection is **vlcp's formulation of SAS from its abstract** (``vlcp.method.sas``), not the authors'
method. Pool class folders are matched to the dataset's classes as ``vlcp evaluate`` matches them;
CLIP embeddings are cached per image content and per class prompt (``vlcp.models.clip``), so a rerun that
only changes ``--sas-keep/--sas-alpha/--sas-lambda/--select/--seed`` computes no embedding and never
loads CLIP. The pool may be a set vlcp wrote (its ``train/``, or its root before issue 23). The output is
the standard layout: ``OUT/train/<class id>/<index>.png`` (kept images in pick order) with
``OUT/train/metadata.jsonl`` (each kept image's pool index and file; from a vlcp pool its prompt too),
``manifest.json`` (every candidate's scores, stage-1 verdict, rank, kept and why), ``preview.png`` and
``preview_pool.png`` (each class's pool with the kept images framed).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlcp.method import sas
from vlcp.method.anchors import real_centroids
from vlcp.models import clip
from vlcp.store.cache import StageCache, stable_hash

log = logging.getLogger("vlcp")
PIXEL_MEMO = "pixel-digest"
ANCHORS = ("prompt", "centroid")
PREVIEW_CLASSES = 20  # preview_pool.png shows the first 20 classes (a 1000-class pool would be unreadable)
PREVIEW_COLUMNS = 60


class SelectError(Exception):
    """A pool that cannot be selected from (too few images, unreadable classes): one line for the user."""


@dataclass
class SelectConfig:
    pool: Path
    data: str
    ipc: int
    out: Path
    data_dir: Path = Path("data")
    clip_model: str | None = None  # hub id or directory; None: the default (or the tiny one)
    tiny: bool = False
    prompt: str = clip.DEFAULT_CLIP_PROMPT
    params: sas.SasParams | None = None  # None: the defaults for ipc
    anchor: str = "prompt"  # prompt | centroid (the real training images' CLIP centroid per class)
    max_per_class: int | None = None  # centroid: the first N real images per class
    allow_duplicates: bool = False
    force: bool = False
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True


@dataclass
class PoolClass:
    folder: str  # the pool's folder name
    class_idx: int  # index into the dataset's classes
    files: list[Path]
    digests: list[str] = field(default_factory=list)  # usable files only, same order as ``usable``
    usable: list[Path] = field(default_factory=list)


def dataset_classes(data: str, data_dir: Path) -> tuple[str, list]:
    """(dataset name, ClassInfo list in the dataset's order), without reading a named subset's images."""
    from vlcp.data.datasets import KNOWN, ClassInfo, load_dataset

    spec = KNOWN.get(data)
    if spec is not None and spec.classes:
        return data, [ClassInfo(f, n) for f, n in sorted(spec.classes)]
    ds = load_dataset(data, data_dir, "train", digest=lambda p: "")  # names only: no file is hashed
    return ds.name, ds.classes


def read_pool(pool: Path, name: str, classes: list) -> list[PoolClass]:
    """The pool's class folders matched to dataset classes (by id or name, as ``vlcp evaluate``)."""
    from vlcp.data.datasets import Dataset, _image_files
    from vlcp.data.images import is_class_dir
    from vlcp.evaluation.samples import NOT_CLASSES, match_classes
    from vlcp.store.output import images_dir

    if not Path(pool).is_dir():
        raise SelectError(f"pool {pool} is not a directory")
    pool = images_dir(Path(pool))  # a vlcp set's train/ (or its root, before issue 23), or any ImageFolder
    subdirs = sorted(d for d in pool.iterdir() if is_class_dir(d) and d.name not in NOT_CLASSES)
    if not subdirs:
        raise SelectError(f"pool {pool} has no class folders: expected an ImageFolder (one sub-folder per class)")
    mapping = match_classes([d.name for d in subdirs], Dataset(name, "train", None, classes, []))
    seen: dict[int, str] = {}
    out = []
    for d in subdirs:
        c = mapping[d.name]
        if c in seen:
            raise SelectError(f"pool folders {seen[c]} and {d.name} are the same class ({classes[c].folder})")
        seen[c] = d.name
        out.append(PoolClass(d.name, c, _image_files(d)))
    return sorted(out, key=lambda pc: pc.class_idx)


def _decode(path: Path) -> np.ndarray:
    from vlcp.data.images import open_rgb

    return np.asarray(open_rgb(path))


def pixel_digests(cache: StageCache, pcs: list[PoolClass]) -> list[dict]:
    """Fill each class's usable files and pixel hashes (memoised per file path, size and mtime).

    Returns the skipped (unreadable) files; a memo hit decodes nothing."""
    from vlcp.data.images import BadImage, without_paths

    skipped = []
    for pc in pcs:
        for f in pc.files:
            st = f.stat()

            def compute(f=f):
                try:
                    return clip.pixel_hash(_decode(f))
                except BadImage as exc:
                    return f"bad: {exc}"

            digest = cache.memo(PIXEL_MEMO, stable_hash([str(f.resolve()), st.st_size, st.st_mtime_ns]), compute)
            if digest.startswith("bad: "):
                skipped.append({"source": str(f), "error": without_paths(digest[5:])})  # PIL quotes the path
            else:
                pc.usable.append(f)
                pc.digests.append(digest)
    return skipped


def check_counts(pcs: list[PoolClass], ipc: int, allow_duplicates: bool, classes: list) -> list[str]:
    """Refuse a class with fewer usable images than IPC (unless duplicates are allowed); warnings otherwise."""
    warnings = []
    for pc in pcs:
        n = len(pc.usable)
        if n == 0:
            raise SelectError(f"pool class folder {pc.folder} holds no usable image")
        if n < ipc and not allow_duplicates:
            raise SelectError(f"pool class folder {pc.folder} ({classes[pc.class_idx].folder}) holds {n} usable "
                              f"image(s), fewer than --ipc {ipc}; pass --allow-duplicates to reuse them")
    small = [pc.folder for pc in pcs if len(pc.usable) <= ipc]
    if small:
        which = "every pool class holds" if len(small) == len(pcs) else \
            f"{len(small)} pool class(es) ({', '.join(small[:5])}) hold"
        warnings.append(f"{which} at most --ipc {ipc} images: there the selection is the identity (it only "
                        f"orders them); generate a larger pool, e.g. {sas.DEFAULT_POOL_MULTIPLIER} x IPC")
    return warnings


def run(cfg: SelectConfig, cache: StageCache) -> dict:
    """Select, write ``cfg.out`` atomically, return the manifest."""
    from vlcp import __version__
    from vlcp.data.images import shown_path
    from vlcp.store.output import check_out, publish
    from vlcp.store.runner import Lazy

    t0 = time.perf_counter()
    params = cfg.params or sas.SasParams(cfg.ipc)
    params.check()
    if cfg.anchor not in ANCHORS:
        raise SelectError(f"--anchor must be one of {', '.join(ANCHORS)}, got {cfg.anchor!r}")
    check_out(Path(cfg.out), cfg.force)
    ds = None
    if cfg.anchor == "centroid":  # the real images are needed anyway: their classes are the dataset's
        ds = real_dataset(cache, cfg.data, Path(cfg.data_dir), cfg.max_per_class)
        name, classes = ds.name, ds.classes
    else:
        name, classes = dataset_classes(cfg.data, Path(cfg.data_dir))
    try:
        prompts = clip.class_prompts([c.name for c in classes], cfg.prompt)
    except ValueError as exc:
        raise SelectError(str(exc)) from None
    pcs = read_pool(Path(cfg.pool), name, classes)
    skipped = pixel_digests(cache, pcs)
    warnings = check_counts(pcs, cfg.ipc, cfg.allow_duplicates, classes)
    if skipped:  # the file relative to the pool the user gave: publish hides whole-path values only
        first, error = skipped[0]["source"], skipped[0]["error"]
        warnings.append(f"skipped {len(skipped)} unreadable image(s) in the pool, e.g. "
                        f"{shown_path(first, cfg.pool)}: {error.removeprefix(Path(first).name + ': ')}")
    ref = clip.resolve_clip(cfg.clip_model, cfg.tiny, cache)
    model = Lazy(lambda: clip.load_clip(ref, cfg.device))
    files = [f for pc in pcs for f in pc.usable]
    labels = np.array([pc.class_idx for pc in pcs for _ in pc.usable], np.int64)
    emb, img_rep = clip.cached_image_embeddings(cache, ref, [d for pc in pcs for d in pc.digests],
                                                lambda i: _decode(files[i]), model, cfg.batch_size,
                                                "clip pool" if cfg.progress else False)
    stages = {"clip_image": img_rep.manifest()}
    if ds is None:
        anchors, text_rep = clip.cached_text_embeddings(cache, ref, prompts, model)
        stages["clip_text"], anchor = text_rep.manifest(), {"kind": "class prompt", "template": cfg.prompt}
    else:
        try:
            anchors, real_rep, used = real_centroids(cache, ref, ds, model, cfg.batch_size, cfg.progress)
        except sas.SasError as exc:
            raise SelectError(str(exc)) from None
        stages["clip_real"] = real_rep.manifest()
        anchor = {"kind": "real-image class centroid", "images_per_class": dict(zip((c.folder for c in classes), used))}
    selection = sas.select(emb, labels, anchors, params)
    kept = {pc.class_idx: _fill(selection.picked[pc.class_idx], cfg.ipc) for pc in pcs}
    manifest = {
        "vlcp_version": __version__, "command": "select", "method": sas.LABEL, "pool": str(Path(cfg.pool).resolve()),
        "data": cfg.data, "ipc": cfg.ipc,
        "parameters": {**params.manifest(), "anchor": cfg.anchor, "clip_prompt": cfg.prompt,
                       "max_per_class": cfg.max_per_class, "allow_duplicates": cfg.allow_duplicates},
        "clip": ref.manifest(), "anchor": anchor,
        "classes": _class_summary(pcs, classes, kept, files),
        "candidates": _candidates(selection, files, pcs, classes, kept, Path(cfg.pool)),
        "stages": stages, "skipped_images": skipped, "warnings": warnings}
    publish(Path(cfg.out), lambda tmp: _write(tmp, manifest, pcs, classes, kept, files, selection, Path(cfg.pool)))
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    return manifest


def real_dataset(cache: StageCache, data: str, data_dir: Path, max_per_class: int | None):
    """The dataset's training split, file hashes memoised on (path, size, mtime) as distill memoises them."""
    import os

    from vlcp.data.datasets import load_dataset
    from vlcp.store.cache import file_digest

    def digest(path: str) -> str:
        st = os.stat(path)
        return cache.memo("file-digest", stable_hash([os.path.abspath(path), st.st_size, st.st_mtime_ns]),
                          lambda: file_digest(path))

    return load_dataset(data, data_dir, "train", max_per_class=max_per_class, digest=digest)


def _fill(picks: list[int], ipc: int) -> list[int]:
    """The picks, reused cyclically up to IPC when the pool is smaller (--allow-duplicates)."""
    return [picks[j % len(picks)] for j in range(ipc)] if picks else []


def _class_summary(pcs, classes, kept, files) -> dict:
    return {classes[pc.class_idx].folder: {
        "name": classes[pc.class_idx].name, "pool_folder": pc.folder, "pool_images": len(pc.files),
        "usable": len(pc.usable),
        "kept": [{"file": f"{j:04d}.png", "source": str(files[i])} for j, i in enumerate(kept[pc.class_idx])]}
        for pc in pcs}


def _candidates(selection: sas.Selection, files, pcs, classes, kept, pool: Path) -> list[dict]:
    out_file = {}
    for c, idx in kept.items():
        for j, i in enumerate(idx):
            out_file.setdefault(i, []).append(f"{classes[c].folder}/{j:04d}.png")
    records = selection.records()
    for r, f in zip(records, files):
        r["class"] = classes[r["class"]].folder
        r["source"] = str(f.relative_to(pool)) if f.is_relative_to(pool) else str(f)
        r["output"] = out_file.get(r["index"], [])
    return records


def _write(tmp: Path, manifest: dict, pcs, classes, kept, files, selection, pool: Path) -> None:
    from vlcp.store.output import contact_sheet, save_images, write_json

    out_classes = [classes[pc.class_idx] for pc in pcs]
    decoded: dict[int, np.ndarray] = {}

    def img(i: int) -> np.ndarray:
        if i not in decoded:
            decoded[i] = _decode(files[i])
        return decoded[i]

    images = {k: [img(i) for i in kept[pc.class_idx]] for k, pc in enumerate(pcs)}
    save_images(tmp, out_classes, images, None, extra=_sources(pool, pcs, classes, kept, files))
    write_json(tmp / "manifest.json", manifest)
    contact_sheet(out_classes, images).save(tmp / "preview.png")
    pool_sheet(pcs, classes, selection, img).save(tmp / "preview_pool.png")


CARRIED = ("prompt", "cluster", "cluster_size")  # from a vlcp pool's metadata.jsonl to the kept image's row


def _sources(pool: Path, pcs, classes, kept, files) -> dict[str, dict]:
    """metadata.jsonl's fields beyond the label, per kept image: its pool index (``source_index``, as in the
    manifest's candidates), its file relative to the pool's images, and from a pool vlcp distilled its prompt,
    cluster and cluster size."""
    from vlcp.store.output import file_name, images_dir, read_metadata

    root, rows = images_dir(pool), read_metadata(pool) or {}
    out = {}
    for pc in pcs:
        for j, i in enumerate(kept[pc.class_idx]):
            rel = files[i].relative_to(root).as_posix() if files[i].is_relative_to(root) else str(files[i])
            src = rows.get(rel, {})
            out[file_name(classes[pc.class_idx].folder, j)] = {"source_index": i, "source": rel,
                                                               **{k: src[k] for k in CARRIED if k in src}}
    return out


def pool_sheet(pcs, classes, selection: sas.Selection, img, cell: int = 48):
    """One row per class (first PREVIEW_CLASSES): the pool in file order; kept images framed in green with
    their pick number, candidates filtered in stage 1 dimmed."""
    from PIL import Image, ImageDraw

    label_w = 160
    shown = pcs[:PREVIEW_CLASSES]
    cols = min(PREVIEW_COLUMNS, max((len(pc.usable) for pc in shown), default=1))
    sheet = Image.new("RGB", (label_w + cols * cell, max(1, len(shown)) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    start = 0
    kept, rank = selection.kept, selection.rank
    for r, pc in enumerate(pcs):
        if r < len(shown):
            c = classes[pc.class_idx]
            draw.text((4, r * cell + cell // 2 - 6), f"{c.folder}: {c.name}"[:26], fill="black")
            for j in range(min(cols, len(pc.usable))):
                i = start + j
                thumb = Image.fromarray(img(i)).resize((cell, cell), Image.BICUBIC)
                if selection.stage1[i] in (sas.NEGATIVE_MARGIN, sas.BELOW_SHARE):
                    thumb = Image.blend(thumb, Image.new("RGB", thumb.size, "white"), 0.6)
                x, y = label_w + j * cell, r * cell
                sheet.paste(thumb, (x, y))
                if kept[i]:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(0, 170, 0), width=3)
                    draw.text((x + 4, y + 3), str(int(rank[i])), fill=(0, 170, 0))
        start += len(pc.usable)
    return sheet
