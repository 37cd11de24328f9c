"""The distilled dataset on disk: written to a temp folder and renamed into place.

``OUT/train/<class folder>/<index>.png`` (class folder = the dataset's canonical id, so ImageFolder,
the Minimax/IDC scripts and DD-Ranking read labels right) with ``OUT/train/metadata.jsonl`` (one line per
image: Hugging Face ``imagefolder``'s metadata), and at ``OUT``'s root everything that is not an image of
the set: ``manifest.json``, ``prototypes.json``, ``preview.png``, ``report.html``, later ``evaluations/``.
``ImageFolder(OUT/train)`` sees exactly the class folders, ``datasets.load_dataset("imagefolder",
data_dir=OUT)`` takes ``train/`` as the train split and ignores the root's files. Readers go through
``images_dir``, which also accepts the layout before (class folders at ``OUT``'s root) and any plain
ImageFolder. A run that is interrupted never leaves a half-written dataset at ``OUT``.

Everything vlcp publishes (``OUT``, its ``evaluations/``, exports, the cache's blobs) is created through
``vlcp.store.files.new_file`` / ``new_dir``, whose modes follow the umask as ``open`` and ``mkdir`` do: ``tempfile``'s 0600
files and 0700 folders would keep those modes after the rename, and a shared ``OUT`` could not be read.
"""
from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
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
    if not sub.is_dir():
        return root
    if (sub / METADATA).is_file():
        return sub
    entries = [p for p in sub.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return root  # an old-layout class folder named "train" holds its images directly
    return sub if any(p.is_dir() for p in entries) else root  # (an empty class folder "train": old layout too)


def file_name(folder: str, j: int) -> str:
    """An image's path inside ``OUT/train``: what metadata.jsonl, the manifest and the report call it."""
    return f"{folder}/{j:04d}.png"


def label_order(folders: Iterable[str]) -> dict[str, int]:
    """Class folder -> label as torchvision's ImageFolder and ``datasets``' ClassLabel number them: sorted names
    (the dataset's own order may differ, e.g. a ``--classes`` subset given out of order)."""
    return {f: i for i, f in enumerate(sorted(set(folders)))}


def write_metadata(images_root: Path, classes: list, counts: Mapping[int, int],
                   extra: Mapping[str, dict] | None = None) -> int:
    """``images_root/metadata.jsonl``: per image (class by class, index order) ``file_name`` (relative to
    ``images_root``), ``label`` (``label_order``), ``class_id`` (the folder), ``class_name``, then the fields
    ``extra[file_name]`` adds (prompt, cluster... or the source). Returns the row count."""
    from vlcp.store.cache import atomic_write_text

    labels = label_order(c.folder for ci, c in enumerate(classes) if counts.get(ci, 0))
    rows = [{"file_name": file_name(c.folder, j), "label": labels[c.folder], "class_id": c.folder,
             "class_name": c.name, **(extra or {}).get(file_name(c.folder, j), {})}
            for ci, c in enumerate(classes) for j in range(counts.get(ci, 0))]
    atomic_write_text(Path(images_root) / METADATA, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def read_metadata(root: Path) -> dict[str, dict] | None:
    """``file_name`` -> row of a set's metadata.jsonl (``root`` is the set or its images folder); None when there
    is none or it is unreadable: readers then fall back to what the layout before it offered."""
    path = images_dir(Path(root)) / METADATA
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return {str(r["file_name"]): r for r in rows if isinstance(r, dict) and "file_name" in r} or None


def prototype_records(protos, manifest) -> dict[str, dict]:
    """``file_name`` -> the ``prompt``, ``cluster`` (index within its class) and ``cluster_size`` of the text
    prototype the image was synthesised from, from a distillation's ``prototypes.json`` and ``manifest.json``:
    image ``j`` of a class is cluster ``j``'s, except after SAS post-sampling, where ``post_sampling.images``
    names each kept image's prototype (an index into the class-major (class, cluster) items); a refinement
    replacement comes from the same prototype and prompt. Odd shapes give fewer records, never an error."""
    as_dict, as_list = _of_type(dict), _of_type(list)
    if not isinstance(protos, dict) or not isinstance(manifest, dict):
        return {}
    clusters = {str(f): [as_dict(r) for r in as_list(as_dict(c).get("clusters"))]
                for f, c in as_dict(protos.get("classes")).items()}

    def record(f: str, j: int) -> dict:
        rec = clusters[f][j]
        out = {"prompt": rec.get("prompt"), "cluster": j, "cluster_size": rec.get("cluster_size")}
        return {k: v for k, v in out.items() if v is not None}

    out = {file_name(f, j): record(f, j) for f, rs in clusters.items() for j in range(len(rs))}
    ipc = as_dict(manifest.get("parameters")).get("ipc")
    order = {c.get("folder"): i for i, c in enumerate(as_list(manifest.get("classes"))) if isinstance(c, dict)}
    for name, rec in as_dict(as_dict(manifest.get("post_sampling")).get("images")).items():
        f, proto = str(name).split("/")[0], as_dict(rec).get("prototype")
        if not (isinstance(proto, int) and isinstance(ipc, int) and ipc > 0):
            continue
        c, j = divmod(proto, ipc)
        if order.get(f, c) == c and j < len(clusters.get(f, [])):  # (a prototype of another class: left out)
            out[name] = record(f, j)
    return {k: v for k, v in out.items() if v}


def _of_type(kind: type):
    """``v`` if it is a ``kind``, else an empty one: manifests of older or killed runs have odd shapes."""
    return lambda v: v if isinstance(v, kind) else kind()


OUTPUT_MARKS = ("manifest.json",)  # what every folder vlcp distill, refine, select and baseline write holds
EXPORT_MARKS = ("classes.json", "diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors")
DETECTION_MARKS = ("report.json",)  # vlcp refine's detection-only folder
NOT_CONTENT = ("lost+found",)  # a freshly formatted volume's: not an output's content, and left in place


def _is_vlcp_file(path: Path) -> bool:
    """A mark file that vlcp wrote: its JSON names vlcp (``vlcp_version``, or the DD-Ranking export's ``format``);
    a weights file of a diffusers export counts by its name. Many tools write a ``manifest.json``."""
    if path.suffix != ".json":
        return path.is_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("vlcp_version" in data or str(data.get("format", "")).startswith("vlcp-"))


def _content(out: Path) -> list[Path]:
    """What replacing ``out`` would remove: all but a volume's lost+found and vlcp's own leftovers of a swap."""
    return [p for p in out.iterdir() if p.name not in NOT_CONTENT and not p.name.startswith((".vlcp-old-", ".vlcp-tmp-"))]


def check_out(out: Path, force: bool, name: str = "--out", marks: tuple[str, ...] = OUTPUT_MARKS) -> None:
    """Refuse, before any work, an output folder (``name``: how the command calls it) that is a file; that is or
    contains the current folder, the cache or the data folder (``files.kept``); or that is not empty, unless it
    is a folder vlcp wrote (it holds one of ``marks``) and ``--force`` is given: a replaced folder goes whole."""
    from vlcp.store.files import kept

    if out.exists() and not out.is_dir():
        raise OutputError(f"{name} {out} is a file, not a folder")
    o = Path(out).resolve()
    for what, folder in kept():
        f = Path(folder).resolve()
        if f == o or o in f.parents:
            raise OutputError(f"{name} {out} is or contains {what} ({folder}): write the output to a folder of "
                              f"its own")
    _check_writable(out, name)
    if out.is_dir() and _content(out):
        if not any(_is_vlcp_file(out / m) for m in marks if (out / m).exists()):
            raise OutputError(f"{name} {out} is not empty and holds no output of vlcp (no {' or '.join(marks)}): "
                              f"not replaced, even with --force; empty it or choose another folder")
        if not force:
            raise OutputError(f"{name} {out} is not empty; pass --force to replace it")


def _work_folder(out: Path) -> Path:
    """Where ``publish`` builds the new folder: beside ``out``, or inside it when it is a mount point."""
    import os

    return out if out.is_dir() and os.path.ismount(out) else out.parent


def _check_writable(out: Path, name: str) -> None:
    """A probe file in the folder ``publish`` will write (its nearest existing ancestor if not made yet): a
    read-only disk or folder is one line before any work, not a traceback after it."""
    from vlcp.store.files import probe_write

    work = Path(out).resolve()
    work = _work_folder(work) if work.exists() else work.parent
    try:
        probe_write(work)
    except OSError as exc:
        where = next((a for a in (work, *work.parents) if a.exists()), work)
        raise OutputError(f"{name} {out} cannot be written: {where} is not writable "
                          f"({exc.strerror or exc})") from None


def check_export(out: Path, dest: Path, force: bool) -> None:
    """``vlcp export``'s DIR: a folder of its own (not OUT, not inside it, not above it), then as ``check_out``
    (an export it may replace holds DD-Ranking's classes.json or diffusers' weights)."""
    o, d = Path(out).resolve(), Path(dest).resolve()
    if d == o or o in d.parents or d in o.parents:
        raise OutputError(f"DIR {dest} and OUT {out} overlap: export to a folder of its own")
    check_out(Path(dest), force, "DIR", EXPORT_MARKS + OUTPUT_MARKS)


def read_manifest(root: Path) -> dict:
    """``root/manifest.json`` as a dict; {} when it is missing, unreadable or not an object (a plain folder)."""
    try:
        m = json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def set_data(root: Path) -> str | None:
    """The dataset a vlcp set was made from: its manifest's ``--data``, else its dataset's name (None: unknown)."""
    m = read_manifest(root)
    params = m.get("parameters") if isinstance(m.get("parameters"), dict) else {}
    ident = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
    return params.get("data") or ident.get("name")


def json_text(obj) -> str:
    """How vlcp writes a JSON file (``write_json``; ``vlcp publish``'s public copies alike)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def write_json(path: Path, obj) -> None:
    from vlcp.store.cache import atomic_write_text

    atomic_write_text(path, json_text(obj))


def publish(out: Path, build) -> None:
    """Call build(tmp_dir), then swap tmp_dir into ``out`` (the old content goes only after success). A mount
    point (a container's ``VOLUME /out``) cannot be renamed: its content is swapped inside it instead."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if _work_folder(out) == out:
        return _publish_inside(out, build)
    tmp = new_dir(out.parent, f".{out.name}.tmp-")
    try:
        build(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            try:
                out.rename(old)
            except OSError as exc:  # a bind mount that ismount does not see (same filesystem): swap inside it
                if exc.errno != errno.EBUSY:
                    raise
                return _publish_inside(out, lambda inside: [shutil.move(str(q), str(inside / q.name))
                                                            for q in sorted(tmp.iterdir())])
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_inside(out: Path, build) -> None:
    """``publish`` into a folder that must stay (a mount point): build in a hidden folder inside it, move the old
    entries aside (``manifest.json`` first), the new ones in (``manifest.json`` last, so a folder with a manifest
    is whole), then delete the old. An error or Ctrl-C while moving puts every entry back where it was; a volume's
    lost+found stays."""
    tmp = new_dir(out, ".vlcp-tmp-")
    try:
        build(tmp)
        old = new_dir(out, ".vlcp-old-")
        first = sorted(_content(out), key=lambda p: p.name != "manifest.json")
        last = sorted(tmp.iterdir(), key=lambda p: p.name == "manifest.json")
        moved: list[tuple[Path, Path]] = []
        try:
            for p in first:
                p.rename(old / p.name)
                moved.append((old / p.name, p))
            for p in last:
                p.rename(out / p.name)
                moved.append((out / p.name, p))
        except BaseException:
            for now, was in reversed(moved):  # new entries back into tmp, then the old ones back into out
                now.rename(was)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_images(folder: Path, classes: list, images: dict[int, Sequence[np.ndarray]], image_size: int | None,
                sheet: "ContactSheet | None" = None, extra: Mapping[str, dict] | None = None) -> int:
    """Write the set under ``folder``: PNGs in ``folder/train/<class folder>/`` resized to image_size (None keeps
    the generated size) and their ``metadata.jsonl`` (``write_metadata``, with ``extra``); return how many.
    ``images`` may be ``vlcp.store.arrays.Arrays``: one image is read (and written) at a time, and put on
    ``sheet`` while it is."""
    from PIL import Image

    root = Path(folder) / IMAGES_DIR
    counts = {}
    for ci, cls in enumerate(classes):
        d = root / cls.folder
        for j, arr in enumerate(images.get(ci, [])):
            if sheet is not None:
                sheet.add(ci, j, arr)
            im = Image.fromarray(arr)
            if image_size and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.LANCZOS)
            d.mkdir(parents=True, exist_ok=True)
            im.save(root / file_name(cls.folder, j))
            counts[ci] = j + 1
    root.mkdir(parents=True, exist_ok=True)
    return write_metadata(root, classes, counts, extra)


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
