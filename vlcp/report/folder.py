"""Reading a distilled folder for the report, leniently: only a missing or malformed manifest is an
error; anything else that is missing or unreadable is noted in ``Folder.problems`` and shown on the page."""
from __future__ import annotations

import csv
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlcp.data.images import is_class_dir
from vlcp.store.output import images_dir, prototype_records, read_metadata

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
NOT_CLASSES = {"evaluations", "ranks", "soft_labels"}  # next to the class folders in a set written before issue 23


class ReportError(Exception):
    """The folder has no readable vlcp manifest: nothing to report (exit code 2)."""


@dataclass
class Folder:
    """What the folder holds, read leniently: ``problems`` says what was missing or unreadable."""
    root: Path
    manifest: dict
    images_root: Path | None = None  # where the class folders are: root/train, or root (sets before issue 23)
    metadata: dict[str, dict] = field(default_factory=dict)  # "<folder>/<file>" -> row of train/metadata.jsonl
    prototypes: dict = field(default_factory=dict)
    classes: list[tuple[str, str]] = field(default_factory=list)  # (folder, human name)
    images: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # folder -> (file, w, h)
    losses: list[float] = field(default_factory=list)
    loss_source: str = ""
    evaluations: list[tuple[str, dict]] = field(default_factory=list)
    published: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def image_src(f: Folder, folder: str, file: str) -> str:
    """An image's path relative to the folder's root, as the page links it (``train/<folder>/<file>``, or
    ``<folder>/<file>`` in a set written before issue 23)."""
    rel = f.images_root.relative_to(f.root).as_posix() if f.images_root and f.images_root != f.root else ""
    return f"{rel}/{folder}/{file}" if rel else f"{folder}/{file}"


def as_dict(v: Any) -> dict:
    """``v`` if it is a dict, else an empty one: manifests from older or killed runs have odd shapes."""
    return v if isinstance(v, dict) else {}


def as_list(v: Any) -> list:
    """``v`` if it is a list, else an empty one."""
    return v if isinstance(v, list) else []


def load(root: Path) -> Folder:
    """Read everything the page shows; only a missing or malformed manifest is an error."""
    manifest_path = root / "manifest.json"
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder")
    if not manifest_path.is_file():
        raise ReportError(f"{root} has no manifest.json: not a folder written by vlcp distill")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{manifest_path} is unreadable ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(manifest, dict):
        raise ReportError(f"{manifest_path} is not a JSON object: not a vlcp manifest")
    f = Folder(root.resolve(), manifest, images_dir(root.resolve()))
    f.prototypes = as_dict(_read_json(root / "prototypes.json", f.problems, required=False))
    f.metadata = read_metadata(f.root) or prototype_records(f.prototypes, manifest)  # a set before metadata.jsonl
    f.classes = class_folders(f)
    f.images = class_images(f.images_root, f.classes)
    f.losses, f.loss_source = loss_curve(f)
    for p in sorted((root / "evaluations").glob("*.json")):
        res = _read_json(p, f.problems, required=True)
        if isinstance(res, dict) and res.get("kind") != "ddranking":  # scores, not a trained network's accuracy
            f.evaluations.append((p.name, res))
    f.published = published()
    return f


def _read_json(path: Path, problems: list[str], required: bool) -> Any:
    if not path.is_file():
        if required:
            problems.append(f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})")
        return None


def class_folders(f: Folder) -> list[tuple[str, str]]:
    """(folder, human name) per class: the manifest's list, else prototypes.json's, else the sub-folders."""
    out: list[tuple[str, str]] = []
    for c in as_list(f.manifest.get("classes")):  # vlcp distill: [{"folder", "name"}]
        if isinstance(c, dict) and isinstance(c.get("folder"), str):
            out.append((c["folder"], str(c.get("name", c["folder"]))))
    if isinstance(f.manifest.get("classes"), dict):  # vlcp select: {folder: {"name", ...}}
        out = [(str(k), str(as_dict(v).get("name", k))) for k, v in f.manifest["classes"].items()]
    if not out:
        out = [(k, str(as_dict(v).get("name", k))) for k, v in as_dict(f.prototypes.get("classes")).items()]
    if not out:
        out = [(d.name, d.name) for d in sorted(f.images_root.iterdir())
               if is_class_dir(d) and d.name not in NOT_CLASSES]
        if out:
            f.problems.append("manifest.json lists no classes: the class folders on disk are shown")
    return out


def class_images(root: Path, classes: list[tuple[str, str]]) -> dict[str, list[tuple[str, int, int]]]:
    """The image files of each class folder, sorted by name, with their pixel size (from the header)."""
    out = {}
    for folder, _ in classes:
        d = root / folder
        if ".." in Path(folder).parts or Path(folder).is_absolute() or not d.is_dir():  # stay inside root
            out[folder] = []
            continue
        try:
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError:  # unreadable folder: shown as empty
            files = []
        out[folder] = [(p.name, *image_size(p)) for p in files]
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR without decoding it; (0, 0) when unknown."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return 0, 0
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return 0, 0


def loss_curve(f: Folder) -> tuple[list[float], str]:
    """Fine-tuning losses per step: finetune_loss.csv, else the manifest's ``finetune.losses``."""
    path = f.root / "finetune_loss.csv"
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            losses = [float(r["loss"]) for r in rows if r.get("loss") not in (None, "")]
            return [v for v in losses if math.isfinite(v)], path.name
        except (OSError, ValueError, KeyError, csv.Error) as exc:
            f.problems.append(f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})")
    losses = as_dict(f.manifest.get("finetune")).get("losses")
    if isinstance(losses, list) and all(isinstance(v, (int, float)) for v in losses):
        return [float(v) for v in losses], "manifest.json"
    return [], ""


def published() -> list[dict]:
    """The paper's published accuracies (``vlcp/report/published.json``, each with its source)."""
    try:
        data = json.loads((Path(__file__).with_name("published.json")).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [e for e in as_list(as_dict(data).get("entries")) if isinstance(e, dict)]
