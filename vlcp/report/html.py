"""``OUT/report.html``: one page to judge a distilled set by looking at it.

Built only from the files in the folder (``manifest.json``, ``prototypes.json``, the class image
folders, ``finetune_loss.csv``, ``evaluations/*.json``, ``preview_refined.png``), so ``vlcp report OUT``
can rebuild it at any time and the page survives being zipped and moved: images are referenced by
relative paths, the loss curve is inline SVG, there is no script and nothing from the network.
A folder left partial by a killed or older run still gets a page: each section shows what exists
and says what is missing or unreadable. Never imports torch: it runs at the end of every
``vlcp distill`` and must stay well under a second for hundreds of images.
"""
from __future__ import annotations

import csv
import json
import re
import struct
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

REPORT = "report.html"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
NOT_CLASSES = {"evaluations"}
MAX_LISTED = 200  # skipped images / warnings listed in full up to this many
MAX_CURVE_POINTS = 800
SCORE_IDS = {"class", "folder", "cluster", "index", "file", "output", "prototype"}  # not scores


class ReportError(Exception):
    """The folder has no readable vlcp manifest: nothing to report (exit code 2)."""


@dataclass
class Folder:
    """What the folder holds, read leniently: ``problems`` says what was missing or unreadable."""
    root: Path
    manifest: dict
    prototypes: dict = field(default_factory=dict)
    classes: list[tuple[str, str]] = field(default_factory=list)  # (folder, human name)
    images: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # folder -> (file, w, h)
    losses: list[float] = field(default_factory=list)
    loss_source: str = ""
    evaluations: list[tuple[str, dict]] = field(default_factory=list)
    published: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def build(out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` atomically from the folder's files; return its path."""
    from vlcp.store.cache import atomic_write_text

    folder = load(Path(out_dir))
    path = folder.root / REPORT
    atomic_write_text(path, render(folder))
    return path


# reading -------------------------------------------------------------------------------------------
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
    f = Folder(root.resolve(), manifest)
    f.prototypes = _dict(_read_json(root / "prototypes.json", f.problems, required=False))
    f.classes = class_folders(f)
    f.images = class_images(f.root, f.classes)
    f.losses, f.loss_source = loss_curve(f)
    for p in sorted((root / "evaluations").glob("*.json")):
        res = _read_json(p, f.problems, required=True)
        if isinstance(res, dict):
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
    for c in _list(f.manifest.get("classes")):  # vlcp distill: [{"folder", "name"}]
        if isinstance(c, dict) and isinstance(c.get("folder"), str):
            out.append((c["folder"], str(c.get("name", c["folder"]))))
    if isinstance(f.manifest.get("classes"), dict):  # vlcp select: {folder: {"name", ...}}
        out = [(str(k), str(_dict(v).get("name", k))) for k, v in f.manifest["classes"].items()]
    if not out:
        out = [(k, str(_dict(v).get("name", k))) for k, v in _dict(f.prototypes.get("classes")).items()]
    if not out:
        out = [(d.name, d.name) for d in sorted(f.root.iterdir())
               if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CLASSES]
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
            return [v for v in losses if v == v and abs(v) != float("inf")], path.name
        except (OSError, ValueError, KeyError, csv.Error) as exc:
            f.problems.append(f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})")
    losses = _dict(f.manifest.get("finetune")).get("losses")
    if isinstance(losses, list) and all(isinstance(v, (int, float)) for v in losses):
        return [float(v) for v in losses], "manifest.json"
    return [], ""


def published() -> list[dict]:
    """The paper's published accuracies (``vlcp/published.json``, each with its source)."""
    try:
        data = json.loads((Path(__file__).with_name("published.json")).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [e for e in _list(_dict(data).get("entries")) if isinstance(e, dict)]


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


# rendering -----------------------------------------------------------------------------------------
def render(f: Folder) -> str:
    """The whole page; a section that cannot be drawn from odd data says so instead of failing."""
    sections: list[tuple[str, Callable[[Folder], str]]] = [
        ("run", header), ("post-sampling", post_sampling_summary), ("fine-tuning", finetune_section),
        ("refinement", refinement_section), ("evaluation", evaluation_section), ("classes", classes_section)]
    body = []
    for name, fn in sections:
        try:
            body.append(fn(f))
        except Exception as exc:  # noqa: BLE001 - odd data in one section must not lose the page
            body.append(f'<section class="problem"><p>The {escape(name)} section could not be drawn from this '
                        f'folder ({escape(exc.__class__.__name__)}: {escape(str(exc))}).</p></section>')
    problems = "".join(f"<li>{escape(p)}</li>" for p in f.problems)
    title = f"vlcp report: {_dataset_name(f.manifest)} IPC {_ipc(f)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{CSS}</style></head><body>'
            f'<main><h1>{escape(title)}</h1>'
            + (f'<div class="problem"><b>Missing or unreadable in this folder:</b><ul>{problems}</ul></div>'
               if problems else "")
            + "".join(body) + "</main></body></html>\n")


def _dataset_name(m: dict) -> str:
    return str(_dict(m.get("dataset")).get("name") or _dict(m.get("parameters")).get("data") or m.get("data") or "?")


def _ipc(f: Folder) -> str:
    ipc = _dict(f.manifest.get("parameters")).get("ipc", f.manifest.get("ipc"))
    return str(ipc) if ipc is not None else "?"


def _num(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v)) if v is not None else "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def header(f: Folder) -> str:
    """Dataset, IPC, models with revisions, stage table, warnings, skipped images, parameters."""
    m = f.manifest
    ds = _dict(m.get("dataset"))
    facts = [("dataset", _dataset_name(m)), ("source", ds.get("source") or ds.get("root")),
             ("training images", ds.get("images")), ("IPC", _ipc(f)), ("classes", len(f.images)),
             ("synthetic images", sum(len(v) for v in f.images.values())), ("vlcp", m.get("vlcp_version")),
             ("tiny models", "yes (noise, for tests)" if m.get("tiny") else None),
             ("total seconds", m.get("seconds")), ("defaults", m.get("defaults_source"))]
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{_num(v)}</dd>" for k, v in facts if v not in (None, ""))
    models = [[escape(str(k)), escape(str(_dict(v).get("name", v))), escape(str(_dict(v).get("identity", ""))),
               escape(str(_dict(v).get("revision") or "–"))] for k, v in _dict(m.get("models")).items()]
    stages = []
    for name, s in _dict(m.get("stages")).items():
        s = _dict(s)
        status = "cached" if s.get("cached") else "computed"
        stages.append([escape(str(name)), f'<span class="{status}">{status}</span>', _num(s.get("items_computed")),
                       _num(s.get("items_cached")), "loaded" if s.get("model_loaded") else "–",
                       _num(s.get("seconds"))])
    params = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(v, default=str))}</td></tr>"
                     for k, v in _dict(m.get("parameters")).items())
    return ('<section id="run"><h2>Run</h2><dl class="facts">' + dl + "</dl>"
            + ("<h3>Models</h3>" + _table(["role", "model", "identity", "revision"], models) if models else "")
            + ("<h3>Stages</h3>" + _table(["stage", "status", "items computed", "items cached", "model",
                                           "seconds"], stages, "num") if stages else "")
            + _listing("Warnings", [escape(str(w)) for w in _list(m.get("warnings"))], "warn")
            + _listing("Skipped images", [f"{escape(str(_dict(s).get('source', s)))}: "
                                          f"{escape(str(_dict(s).get('error', '')))}"
                                          for s in _list(m.get("skipped_images"))], "warn")
            + (f'<details><summary>All parameters</summary><table class="params">{params}</table></details>'
               if params else "") + "</section>")


def _listing(title: str, items: list[str], cls: str) -> str:
    if not items:
        return ""
    more = f"<li>… and {len(items) - MAX_LISTED} more (see manifest.json)</li>" if len(items) > MAX_LISTED else ""
    lis = "".join(f"<li>{i}</li>" for i in items[:MAX_LISTED])
    return f'<h3>{escape(title)} ({len(items)})</h3><ul class="{cls}">{lis}{more}</ul>'


def post_sampling_summary(f: Folder) -> str:
    """Run-level values of a ``post_sampling`` manifest section (per-image scores go on the cards)."""
    m = f.manifest
    ps = _dict(m.get("post_sampling"))
    if m.get("command") == "select":  # a folder `vlcp select` wrote: the selection is the whole run
        ps = {"method": m.get("method"), "pool": m.get("pool"), "candidates": len(_list(m.get("candidates"))), **ps}
    scalars = {k: v for k, v in ps.items() if isinstance(v, (str, int, float, bool)) or v is None}
    sheet = ('<details><summary>preview_pool.png: each class\'s pool, the kept images framed</summary>'
             '<img class="sheet" src="preview_pool.png" alt="the pool per class, kept images framed"></details>'
             if (f.root / "preview_pool.png").is_file() else "")
    if not scalars and not sheet:
        return ""
    dl = "".join(f"<dt>{escape(str(k))}</dt><dd>{_num(v, 4)}</dd>" for k, v in scalars.items())
    return f'<section id="post-sampling"><h2>Post-sampling</h2><dl class="facts">{dl}</dl>{sheet}</section>'


def finetune_section(f: Folder) -> str:
    ft = _dict(f.manifest.get("finetune"))
    if not f.losses and not ft and not (f.root / "finetune_loss.png").is_file():
        return ""
    facts = "".join(f"<dt>{escape(str(k))}</dt><dd>{_num(v, 4)}</dd>" for k, v in ft.items()
                    if isinstance(v, (str, int, float)) and not isinstance(v, bool))
    if f.losses:
        plot = loss_svg(f.losses) + f'<p class="note">{len(f.losses)} steps, from {escape(f.loss_source)}</p>'
    elif (f.root / "finetune_loss.png").is_file():
        plot = '<img class="plot" src="finetune_loss.png" alt="fine-tuning loss">'
    else:
        plot = '<p class="note">No loss curve in this folder (finetune_loss.csv is missing).</p>'
    return f'<section id="finetune"><h2>Fine-tuning</h2><dl class="facts">{facts}</dl>{plot}</section>'


def loss_svg(losses: list[float], width: int = 720, height: int = 260) -> str:
    """The loss per step (light) and its moving average (dark) as inline SVG with min/max labels."""
    n = len(losses)
    step = max(1, -(-n // MAX_CURVE_POINTS))
    pts = [(i, losses[i]) for i in range(0, n, step)]
    window = max(1, n // 50)
    acc, smooth = 0.0, []
    for i, v in enumerate(losses):
        acc += v - (losses[i - window] if i >= window else 0.0)
        if i % step == 0:
            smooth.append((i, acc / min(i + 1, window)))
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    left, right, top, bottom = 64, 12, 12, 36
    pw, ph = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> str:
        return f"{left + pw * i / max(1, n - 1):.1f},{top + ph * (1 - (v - lo) / span):.1f}"

    raw = " ".join(xy(i, v) for i, v in pts)
    avg = " ".join(xy(i, v) for i, v in smooth)
    return (f'<svg class="loss" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="fine-tuning loss per step">'
            f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>'
            f'<polyline points="{raw}" class="raw"/><polyline points="{avg}" class="avg"/>'
            f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{hi:.4g}</text>'
            f'<text x="{left - 6}" y="{top + ph}" text-anchor="end">{lo:.4g}</text>'
            f'<text x="{left}" y="{height - 14}">0</text>'
            f'<text x="{left + pw}" y="{height - 14}" text-anchor="end">{n - 1}</text>'
            f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">step (line: mean of {window})'
            f'</text></svg>')


def refinement_section(f: Folder) -> str:
    """The detector, the selection settings, per class counts and confidences, the before/after sheet."""
    r = _dict(f.manifest.get("refinement"))
    if not r:
        return ""
    det = _dict(r.get("detector"))
    facts = [("detector", det.get("model")), ("detector source", det.get("source")),
             ("detector epochs", det.get("epochs")), ("detector test accuracy (%)", det.get("accuracy")),
             ("β (defective if p ≤ β)", r.get("beta")), ("candidates per defective image", r.get("candidates")),
             ("top-k", r.get("top_k")), ("images replaced", len(_dict(r.get("replacements"))))]
    pool = "pool_replacements" in r  # after SAS post-sampling: the next-ranked pool candidate first
    if pool:
        facts.append(("replaced from the SAS pool first", sum(isinstance(d, dict) and d.get("candidate") is not None
                                                              for d in _dict(r.get("pool_replacements")).values())))
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{_num(v)}</dd>" for k, v in facts if v is not None)
    names = dict(f.classes)
    rows = []
    for folder, s in _dict(r.get("per_class")).items():
        s = _dict(s)
        first = [_num(s.get("defective_before_pool")), _num(s.get("pool_replaced"))] if pool else []
        rows.append([escape(f"{folder} · {names.get(folder, folder)}"), _num(s.get("images")), *first,
                     _num(s.get("defective")), _num(s.get("valid")), _num(s.get("fallback")),
                     f"{_num(s.get('confidence_before'), 3)} → {_num(s.get('confidence_after'), 3)}"])
    head = ["class", "images", *(["defective after SAS", "from the SAS pool"] if pool else []), "defective",
            "from a valid pool", "by fallback", "mean p(class) before → after"]
    table = _table(head, rows, "num") if rows else ""
    sheet = ('<details><summary>preview_refined.png: each replaced image (left) and its replacement (right)'
             '</summary><img class="sheet" src="preview_refined.png" alt="replaced images and their replacements">'
             '</details>') if (f.root / "preview_refined.png").is_file() else ""
    return (f'<section id="refinement"><h2>Detector-guided refinement</h2><dl class="facts">{dl}</dl>{table}{sheet}'
            '</section>')


# evaluation ----------------------------------------------------------------------------------------
def _pm(a: Any) -> str:
    a = _dict(a)
    if not isinstance(a.get("mean"), (int, float)):
        return "–"
    return f"{a['mean']:.2f} ± {a['std']:.2f}" if isinstance(a.get("std"), (int, float)) else f"{a['mean']:.2f}"


def evaluation_row(name: str, res: dict) -> dict:
    """One evaluation file as the table's cells (missing keys show as –)."""
    p, acc = _dict(res.get("protocol")), _dict(res.get("accuracy"))
    counts = [v for v in _dict(res.get("images_per_class")).values() if isinstance(v, int)]
    per_seed = " ".join(_num(v) for v in _list(acc.get("per_seed")))
    return {"file": name, "dataset": str(_dict(res.get("dataset")).get("name", "")), "model": str(p.get("model", "?")),
            "protocol": str(p.get("name", "?")), "ipc": min(counts) if counts else None,
            "epochs": p.get("epochs"), "final": _pm(acc), "best": _pm(acc.get("best_during_training")),
            "best_label": str(res.get("best_label") or "best during training"), "per_seed": per_seed or "–",
            "seeds": len(_list(res.get("seeds"))) or len(_list(acc.get("per_seed"))),
            "seconds": res.get("seconds"), "device": res.get("device"), "full": bool(res.get("full"))}


def matching_published(f: Folder, dataset: str, ipc: Any, protocol: str | None = None,
                       model: str | None = None) -> list[dict]:
    """Published entries for this dataset and IPC (and protocol/model when given); Table 5 rows only for
    the folder's own --text-strategy."""
    strategy = _dict(f.manifest.get("parameters")).get("text_strategy")
    return [e for e in f.published if e.get("dataset") == dataset and e.get("ipc") == ipc
            and (protocol is None or e.get("protocol") == protocol) and (model is None or e.get("model") == model)
            and e.get("text_strategy", strategy) == strategy]


def evaluation_section(f: Folder) -> str:
    """vlcp's evaluations of this folder next to the paper's numbers for the same setting."""
    dataset = _dataset_name(f.manifest)
    ipc = _dict(f.manifest.get("parameters")).get("ipc")
    rows, evals = [], [evaluation_row(n, r) for n, r in f.evaluations]
    for e in evals:
        paper = [p for p in matching_published(f, e["dataset"] or dataset, e["ipc"], e["protocol"], e["model"])
                 if p.get("method") == "VLCP"]
        paper_cell = (f'{_pm(paper[0])} <span class="src">{escape(str(paper[0].get("source", "")))}</span>'
                      if paper else "–")
        rows.append([escape(e["model"]), escape(e["protocol"]), _num(e["ipc"]), _num(e["epochs"]), _num(e["seeds"]),
                     f'<b>{e["final"]}</b>', f'{e["best"]}<br><span class="src">{escape(e["best_label"])}</span>',
                     escape(e["per_seed"]), paper_cell, f'<span class="src">{escape(e["file"])}</span>'])
    table = (_table(["model", "protocol", "IPC", "epochs", "seeds", "top-1 % (final epoch)", "best %", "per seed",
                     "paper (VLCP)", "file"], rows, "num") if rows else
             '<p class="note">No evaluation yet: <code>vlcp evaluate OUT --data '
             f'{escape(dataset)} --json results.json</code> adds its results to <code>OUT/evaluations/</code>.</p>')
    return ('<section id="evaluation"><h2>Evaluation</h2>' + table + fusion_rows(f.evaluations)
            + published_table(f, dataset, ipc, {(e["protocol"], e["model"]): e["final"] for e in evals}) + "</section>")


def fusion_rows(evaluations: list[tuple[str, dict]]) -> str:
    """The ``--caption-fusion`` results: a separate list under the table, never in the headline column."""
    items = []
    for name, res in evaluations:
        fu, p = _dict(res.get("caption_fusion")), _dict(res.get("protocol"))
        if fu:
            items.append(f'<li>{escape(str(p.get("model", "?")))}, {escape(str(p.get("name", "?")))}: '
                         f'<b>{_pm(fu.get("accuracy"))}</b> — {escape(str(fu.get("note", "")))} '
                         f'<span class="src">{escape(str(fu.get("label", "")))}; {escape(name)}</span></li>')
    return (f'<p class="note">Caption fusion (a separate row, never the headline):</p><ul>{"".join(items)}</ul>'
            if items else "")


def published_table(f: Folder, dataset: str, ipc: Any, ours: dict[tuple[str, str], str]) -> str:
    """The paper's table rows for this dataset and IPC: one row per (protocol, network), one column per method."""
    entries = matching_published(f, dataset, ipc)
    if not entries:
        return ""
    methods: list[str] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for e in entries:
        m = str(e.get("method"))
        if m not in methods:
            methods.append(m)
        cells.setdefault((str(e.get("protocol")), str(e.get("model"))), {})[m] = _pm(e)
    rows = [[escape(model), escape(proto), f"<b>{ours[(proto, model)]}</b>" if (proto, model) in ours else "–"]
            + [cells[(proto, model)].get(m, "–") for m in methods] for (proto, model) in cells]
    sources = sorted({str(e.get("source", "")) for e in entries})
    return (f"<h3>Published for {escape(dataset)}, IPC {_num(ipc)} (top-1 %, mean ± std)</h3>"
            + _table(["network", "vlcp protocol", "this folder"] + [escape(m) for m in methods], rows, "num published")
            + '<p class="src">' + "; ".join(escape(s) for s in sources) + " — vlcp/published.json</p>")


# classes -------------------------------------------------------------------------------------------
WORD = re.compile(r"[A-Za-z]+")


def highlight(caption: str, representative: dict, non_representative: list) -> str:
    """The caption, escaped, with R_w words marked and N words dimmed (matched as Algorithm 2 reads
    words: lower-cased runs of letters)."""
    rep = {str(w).lower() for w in representative}
    non = {str(w).lower() for w in non_representative}
    out, last = [], 0
    for m in WORD.finditer(caption):
        w = m.group(0).lower()
        cls = "rw" if w in rep else "nw" if w in non else ""
        if cls:
            out.append(escape(caption[last:m.start()]) + f'<mark class="{cls}">{escape(m.group(0))}</mark>')
            last = m.end()
    return "".join(out) + escape(caption[last:])


def words_html(representative: dict, non_representative: list) -> str:
    """R_w as (word, frequency) chips, most frequent first; N as a plain list (the paper's Table 6)."""
    rw = sorted(((str(w), c) for w, c in representative.items()), key=lambda t: (-_freq(t[1]), t[0]))
    chips = "".join(f'<span class="chip rw">{escape(w)} <small>{_num(c)}</small></span>' for w, c in rw)
    nw = ", ".join(escape(str(w)) for w in non_representative)
    return (f'<div class="words"><span class="lbl">R<sub>w</sub></span> {chips or "<i>none</i>"}</div>'
            f'<div class="words"><span class="lbl">N</span> <span class="nlist">{nw or "<i>none</i>"}</span></div>')


def _freq(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def prototype_html(rec: dict) -> str:
    """A cluster's text prototype: caption with highlights, R_w, N, score, the prompt if it differs."""
    caption = str(rec.get("caption") or "")
    rep, non = _dict(rec.get("representative_words")), _list(rec.get("non_representative"))
    parts = [f'<p class="caption">{highlight(caption, rep, non) if caption else "<i>no caption</i>"}</p>',
             words_html(rep, non)]
    meta = []
    if "score" in rec:
        meta.append(f"score {_num(rec.get('score'))}" + (" (fallback: closest member)" if rec.get("fallback") else ""))
    if rec.get("member"):
        meta.append(f"from {escape(str(rec['member']))}")
    if meta:
        parts.append(f'<p class="meta">{" · ".join(meta)}</p>')
    prompt = rec.get("prompt")
    if isinstance(prompt, str) and prompt != caption:
        parts.append(f'<p class="prompt"><span class="lbl">prompt</span> {escape(prompt)}</p>')
    return "".join(parts)


def verdict_html(rep: dict | None, refined: bool, from_pool: dict | None = None) -> str:
    """Refinement verdict of one image: kept, replaced by the next-ranked SAS pool candidate of its
    prototype, or replaced by a generated candidate (how, pool, p before → after)."""
    if rep is None and from_pool is not None and from_pool.get("candidate") is not None:
        return (f'<p class="verdict replaced">refinement: replaced by SAS pool candidate '
                f'{_num(from_pool.get("candidate"))} (rank {_num(from_pool.get("rank"))} of its class, the '
                f'next-ranked of its prototype)</p>')
    if rep is None:
        return '<p class="verdict kept">refinement: kept</p>' if refined else ""
    pool = len(_list(rep.get("pool")))
    how = (f"from a valid pool of {pool}" if rep.get("how") == "valid" else
           "as fallback: no candidate was valid" if rep.get("how") == "fallback" else str(rep.get("how", "")))
    return (f'<p class="verdict replaced">refinement: replaced by candidate {_num(rep.get("candidate"))} '
            f'({escape(how)}); p(class) {_num(rep.get("p_before"), 3)} → {_num(rep.get("p_after"), 3)}</p>')


def scores_html(scores: dict | None) -> str:
    """Post-sampling scores of one image, whatever their names."""
    if not scores:
        return ""
    items = "".join(f"<dt>{escape(str(k))}</dt><dd>{_num(v, 3)}</dd>" for k, v in scores.items()
                    if isinstance(v, (str, int, float, bool)) or v is None)
    return f'<dl class="scores">{items}</dl>' if items else ""


def post_sampling_lookup(f: Folder) -> Callable[[str, str, int, int], dict | None]:
    """Per-image post-sampling scores by "folder/file", "folder/index", the global index, or records
    naming class and cluster/index; the section's container may be ``images``, ``per_image`` or ``scores``."""
    ps = _dict(f.manifest.get("post_sampling"))
    box = next((ps[k] for k in ("images", "per_image", "scores") if isinstance(ps.get(k), (dict, list))), None)
    by_key: dict[str, dict] = {}
    if isinstance(box, dict):
        by_key = {str(k): v for k, v in box.items() if isinstance(v, dict)}
    elif isinstance(box, list):
        for i, rec in enumerate(box):
            if isinstance(rec, dict):
                by_key[str(i)] = rec
                folder = rec.get("class", rec.get("folder"))
                idx = rec.get("cluster", rec.get("index"))
                if folder is not None and idx is not None:
                    by_key[f"{folder}/{idx}"] = rec
                if folder is not None and rec.get("file"):
                    by_key[f"{folder}/{rec['file']}"] = rec

    for rec in _list(f.manifest.get("candidates")):  # vlcp select: every pool image, "output" names its copies
        if isinstance(rec, dict):
            for out in _list(rec.get("output")):
                by_key.setdefault(str(out), rec)

    def lookup(folder: str, file: str, j: int, i: int) -> dict | None:
        for k in (f"{folder}/{file}", f"{folder}/{j}", str(i)):
            if k in by_key:
                return {a: b for a, b in by_key[k].items() if a not in SCORE_IDS}
        return None

    return lookup


def classes_section(f: Folder) -> str:
    """A navigation line, then per class its images in a grid with their prototypes and verdicts."""
    protos = _dict(f.prototypes.get("classes"))
    refinement = _dict(f.manifest.get("refinement"))
    replacements = {(str(r.get("class")), r.get("cluster")): r
                    for r in _dict(refinement.get("replacements")).values() if isinstance(r, dict)}
    from_pool = {(str(r.get("class")), r.get("cluster")): r
                 for r in _dict(refinement.get("pool_replacements")).values() if isinstance(r, dict)}
    scores = post_sampling_lookup(f)
    nav = " ".join(f'<a href="#class-{c}">{escape(folder)}</a>' for c, (folder, _) in enumerate(f.classes))
    legend = ('<p class="note">Under each image: its cluster, and the cluster\'s text prototype (Algorithm 2): the '
              'chosen caption with the representative words R<sub>w</sub> (Eq. 3) '
              '<span class="key-rw">highlighted</span> and the non-representative words N (Eq. 2) '
              '<span class="key-nw">dimmed</span>; R<sub>w</sub> with their frequencies (captions of the cluster '
              'that contain the word).</p>')
    parts, i = [f'<section id="classes"><h2>Classes</h2>{legend}<nav>{nav}</nav>'], 0
    for c, (folder, name) in enumerate(f.classes):
        clusters = _list(_dict(protos.get(folder)).get("clusters"))
        cards = []
        for pos, (file, w, h) in enumerate(f.images.get(folder, [])):
            stem = Path(file).stem
            j = int(stem) if stem.isdigit() else pos
            rec = _dict(clusters[j]) if j < len(clusters) else {}
            verdict = verdict_html(replacements.get((folder, j)), bool(refinement), from_pool.get((folder, j)))
            cards.append(card(folder, name, file, (w, h), j, rec, verdict, scores(folder, file, j, i)))
            i += 1
        parts.append(class_block(f, c, folder, name, cards))
    return "".join(parts) + "</section>"


def class_block(f: Folder, c: int, folder: str, name: str, cards: list[str]) -> str:
    stats = []
    used = _dict(f.manifest.get("images_per_class")).get(folder)
    if used is not None:
        stats.append(f"{_num(used)} real images")
    removed = _dict(_dict(f.manifest.get("outliers")).get(folder)).get("removed")
    if removed is not None:
        stats.append(f"{_num(removed)} removed as outliers (LOF)")
    ref = _dict(_dict(_dict(f.manifest.get("refinement")).get("per_class")).get(folder))
    if ref:
        stats.append(f"refinement: {_num(ref.get('defective'))} defective, mean p(class) "
                     f"{_num(ref.get('confidence_before'), 3)} → {_num(ref.get('confidence_after'), 3)}")
    body = "".join(cards) if cards else f'<p class="problem">No images in {escape(folder)}/.</p>'
    title = escape(folder) if name == folder else f"{escape(folder)} <small>{escape(name)}</small>"
    return (f'<article class="class" id="class-{c}" data-folder="{escape(folder)}"><h3>{title}</h3>'
            f'<p class="stats">{" · ".join(stats + [f"{len(cards)} synthetic"])}</p>'
            f'<div class="grid">{body}</div></article>')


def card(folder: str, name: str, file: str, size: tuple[int, int], j: int, rec: dict, verdict: str,
         scores: dict | None) -> str:
    """One synthetic image with its cluster's size and text prototype."""
    w, h = size
    src = escape(quote(f"{folder}/{file}"))
    pix = " pixelated" if 0 < w < 96 else ""
    dims = f' width="{w}" height="{h}"' if w and h else ""
    size_txt = f" · cluster of {_num(rec['cluster_size'])} images" if "cluster_size" in rec else ""
    return (f'<figure class="card"><a href="{src}"><img class="syn{pix}" src="{src}"{dims} '
            f'alt="{escape(name)}, image {j}"></a><figcaption><p class="head"><b>{escape(file)}</b>{size_txt}'
            f'</p>{verdict}{scores_html(scores)}{prototype_html(rec) if rec else ""}</figcaption></figure>')


CSS = """
:root{--fg:#1d2330;--muted:#5f6b7a;--line:#dde2ea;--bg:#f6f7f9;--card:#fff;--accent:#2f5fd0;--rw:#ffe08a;--warn:#9a4b00}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 16px}
h2{font-size:19px;margin:0 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 8px}
h3 small{font-weight:normal;color:var(--muted);margin-left:6px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:0 0 18px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.facts dt{color:var(--muted)} dl.facts dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#eef1f6;font-weight:600}
table.num td{font-variant-numeric:tabular-nums}
table.params th{font-weight:normal;color:var(--muted)} table.params td{overflow-wrap:anywhere}
details summary{cursor:pointer;color:var(--accent);margin-top:10px}
.cached{color:#1d7a3a} .computed{color:var(--accent)}
ul.warn{color:var(--warn);margin:4px 0}
.problem{background:#fff4e5;border:1px solid #f0c27b;border-radius:8px;padding:10px 16px;margin:0 0 18px}
.note{color:var(--muted)} .src{color:var(--muted);font-size:12px}
nav{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:8px}
nav a{color:var(--accent);text-decoration:none;border:1px solid var(--line);border-radius:12px;padding:1px 9px}
article.class{border-top:1px solid var(--line);padding-top:4px}
.stats{color:var(--muted);margin:0 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
figure{margin:0}
.card{background:#fbfcfd;border:1px solid var(--line);border-radius:8px;padding:10px;display:flex;flex-direction:column}
.card a{align-self:center}
img.syn{width:160px;height:160px;object-fit:contain;background:#e9ecf1;border-radius:4px;display:block}
img.pixelated{image-rendering:pixelated}
img.sheet,img.plot{max-width:100%;image-rendering:pixelated;border:1px solid var(--line)}
figcaption{font-size:12.5px;margin-top:8px}
figcaption p{margin:4px 0}
.head{color:var(--muted)} .head b{color:var(--fg)}
.caption{background:#f3f5f8;border-radius:4px;padding:6px 8px;overflow-wrap:anywhere}
mark.rw{background:var(--rw);border-radius:2px;padding:0 1px}
mark.nw{background:none;color:#98a1ad}
.key-rw{background:var(--rw);color:var(--fg);padding:0 2px} .key-nw{color:#98a1ad}
.words{margin:3px 0;line-height:1.9}
.lbl{display:inline-block;min-width:26px;font-weight:600;color:var(--muted)}
.chip{display:inline-block;border-radius:10px;padding:0 7px;margin:0 3px 0 0;line-height:1.6}
.chip.rw{background:var(--rw)} .chip small{color:#7a5a00}
.nlist{color:#8a94a0}
.meta,.prompt{color:var(--muted)}
.verdict{font-weight:600;border-radius:4px;padding:2px 6px}
.verdict.replaced{background:#fde8e8;color:#9b1c1c} .verdict.kept{background:#e7f6ec;color:#1d7a3a}
dl.scores{display:grid;grid-template-columns:max-content 1fr;gap:0 10px;margin:4px 0}
dl.scores dt{color:var(--muted)} dl.scores dd{margin:0}
svg.loss{max-width:100%;height:auto;font-size:11px;fill:var(--muted)}
svg.loss .frame{fill:#fbfcfd;stroke:var(--line)}
svg.loss .raw{fill:none;stroke:#a9bdf0;stroke-width:1}
svg.loss .avg{fill:none;stroke:var(--accent);stroke-width:2}
"""
