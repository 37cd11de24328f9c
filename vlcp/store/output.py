"""The distilled dataset on disk: an ImageFolder written to a temp folder and renamed into place.

``OUT/<class folder>/<index>.png`` (class folder = the dataset's canonical id, so ImageFolder,
the Minimax/IDC scripts and DD-Ranking read labels right), ``manifest.json``, ``prototypes.json``
and ``preview.png``. A run that is interrupted never leaves a half-written dataset at ``OUT``.

Everything vlcp publishes (``OUT``, its ``evaluations/``, exports, the cache's blobs) is created through
``vlcp.store.files.new_file`` / ``new_dir``, whose modes follow the umask as ``open`` and ``mkdir`` do: ``tempfile``'s 0600
files and 0700 folders would keep those modes after the rename, and a shared ``OUT`` could not be read.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vlcp.store.files import new_dir


IMAGES_DIR = "train"  # OUT/train/<class>/<i>.png: the images, their metadata.jsonl, nothing else
METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class OutputError(Exception):
    pass


def images_dir(root: Path) -> Path:
    """Where a synthetic set's class folders are: ``root/train`` (the layout since issue 23, which keeps
    manifest, report, card and evaluations out of ``ImageFolder(root/train)`` and ``datasets``' imagefolder)
    or ``root`` itself (the layout before it, and any plain ImageFolder a user points at)."""
    root = Path(root)
    sub = root / IMAGES_DIR
    if sub.is_dir() and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in sub.iterdir()):
        return sub  # (an old-layout class folder named "train" holds its images directly)
    return root


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder without ``--force``, before any work."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"--out {out} is not empty; pass --force to replace it")


def write_json(path: Path, obj) -> None:
    from vlcp.store.cache import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def publish(out: Path, build) -> None:
    """Call build(tmp_dir), then swap tmp_dir into ``out`` (the old content goes only after success)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_dir(out.parent, f".{out.name}.tmp-")
    try:
        build(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_images(folder: Path, classes: list, images: dict[int, Sequence[np.ndarray]], image_size: int | None,
                sheet: "ContactSheet | None" = None) -> int:
    """Write PNGs resized to image_size (None keeps the generated size); return how many. ``images`` may be
    ``vlcp.store.arrays.Arrays``: one image is read (and written) at a time, and put on ``sheet`` while it is."""
    from PIL import Image

    n = 0
    for ci, cls in enumerate(classes):
        d = folder / cls.folder
        d.mkdir(parents=True, exist_ok=True)
        for j, arr in enumerate(images.get(ci, [])):
            if sheet is not None:
                sheet.add(ci, j, arr)
            im = Image.fromarray(arr)
            if image_size and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.LANCZOS)
            im.save(d / f"{j:04d}.png")
            n += 1
    return n


class ContactSheet:
    """preview.png: one row per class, labelled with its human name, its first ``max_cols`` images; filled
    image by image (``add``), so the output reads each synthetic image once for its PNG and the sheet."""
    LABEL_W = 160

    def __init__(self, classes: list, per_class: int, cell: int = 64, max_cols: int = 10):
        from PIL import Image, ImageDraw

        self.cols, self.cell = min(max_cols, max(per_class, 1)), cell
        self.image = Image.new("RGB", (self.LABEL_W + self.cols * cell, max(1, len(classes)) * cell), "white")
        draw = ImageDraw.Draw(self.image)
        for ci, cls in enumerate(classes):
            draw.text((4, ci * cell + cell // 2 - 6), f"{cls.folder}: {cls.name}"[:26], fill="black")

    def add(self, ci: int, j: int, arr: np.ndarray) -> None:
        from PIL import Image

        if j < self.cols:
            cell = self.cell
            self.image.paste(Image.fromarray(arr).resize((cell, cell), Image.BICUBIC),
                             (self.LABEL_W + j * cell, ci * cell))


def contact_sheet(classes: list, images: dict[int, Sequence[np.ndarray]], cell: int = 64, max_cols: int = 10):
    """The contact sheet of images already written (``vlcp select``)."""
    sheet = ContactSheet(classes, max((len(v) for v in images.values()), default=1), cell, max_cols)
    for ci in range(len(classes)):
        for j, arr in enumerate(images.get(ci, [])[:sheet.cols]):
            sheet.add(ci, j, arr)
    return sheet.image


def before_after_sheet(pairs: Iterable[tuple[np.ndarray, np.ndarray, str]], n: int, cell: int = 64):
    """preview_refined.png: each replaced image next to its replacement, labelled with the class (``n`` pairs,
    which may come from a generator: one pair in memory at a time)."""
    from PIL import Image, ImageDraw

    label_w = 160
    sheet = Image.new("RGB", (label_w + 2 * cell + 20, max(1, n) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (before, after, name) in enumerate(pairs):
        draw.text((4, r * cell + cell // 2 - 6), name[:26], fill="black")
        sheet.paste(Image.fromarray(before).resize((cell, cell), Image.BICUBIC), (label_w, r * cell))
        draw.text((label_w + cell + 5, r * cell + cell // 2 - 6), "->", fill="black")
        sheet.paste(Image.fromarray(after).resize((cell, cell), Image.BICUBIC), (label_w + cell + 20, r * cell))
    return sheet
