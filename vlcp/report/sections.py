"""The data of the report's sections above the class grid (run, post-sampling, fine-tuning, refinement,
evaluation): plain strings and dataclasses, formatted here so the templates only lay them out. None
means the section has nothing to show; odd manifest values become text, never markup. A local absolute path
(dataset folder, models, OUT, sources) shows as the card shows it (``card.public``: ``…/<its last part>``): the
page is uploaded by ``vlcp publish`` as it is."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlcp.report.card import public, public_values
from vlcp.report.folder import Folder, as_dict, as_list
from vlcp.report.plots import LossPlot, loss_plot

MAX_LISTED = 200  # skipped images / warnings listed in full up to this many


# formatting ----------------------------------------------------------------------------------------
def num(v: Any, digits: int = 2) -> str:
    """A number as the page prints it (floats with ``digits`` decimals); other values as text, None as –."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v) if v is not None else "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def pm(a: Any) -> str:
    """An accuracy record as "mean ± std" (or the mean alone, or – without a mean)."""
    a = as_dict(a)
    if not isinstance(a.get("mean"), (int, float)):
        return "–"
    return f"{a['mean']:.2f} ± {a['std']:.2f}" if isinstance(a.get("std"), (int, float)) else f"{a['mean']:.2f}"


def dataset_name(m: dict) -> str:
    return str(as_dict(m.get("dataset")).get("name") or as_dict(m.get("parameters")).get("data") or m.get("data")
               or "?")


def ipc_text(f: Folder) -> str:
    ipc = as_dict(f.manifest.get("parameters")).get("ipc", f.manifest.get("ipc"))
    return str(ipc) if ipc is not None else "?"


@dataclass
class Table:
    """A table of plain-text cells."""
    head: list[str]
    rows: list[list[str]]
    cls: str = ""


@dataclass
class Listing:
    """A titled list cut at MAX_LISTED items; ``more`` counts the rest."""
    title: str
    items: list[str]
    total: int
    more: int


def listing(title: str, items: list[str]) -> Listing | None:
    return Listing(title, items[:MAX_LISTED], len(items), max(0, len(items) - MAX_LISTED)) if items else None


# run -----------------------------------------------------------------------------------------------
@dataclass
class RunSection:
    facts: list[tuple[str, str]]
    models: Table | None
    stages: list[list[str]]  # stage, "cached"/"computed", items computed, items cached, model, seconds
    warnings: Listing | None
    skipped: Listing | None
    parameters: list[tuple[str, str]]  # name, JSON value


def run_section(f: Folder) -> RunSection:
    """Dataset, IPC, models with revisions, stage table, warnings, skipped images, parameters."""
    m = f.manifest
    ds = as_dict(m.get("dataset"))
    facts = [("dataset", public(dataset_name(m))), ("source", public(ds.get("source") or ds.get("root"))),
             ("training images", ds.get("images")), ("IPC", ipc_text(f)), ("classes", len(f.images)),
             ("synthetic images", sum(len(v) for v in f.images.values())), ("vlcp", m.get("vlcp_version")),
             ("tiny models", "yes (noise, for tests)" if m.get("tiny") else None),
             ("total seconds", m.get("seconds")), ("defaults", m.get("defaults_source"))]
    models = [[str(k), str(public(as_dict(v).get("name", v))), str(public(as_dict(v).get("identity", ""))),
               str(as_dict(v).get("revision") or "–")] for k, v in as_dict(m.get("models")).items()]
    stages = []
    for name, s in as_dict(m.get("stages")).items():
        s = as_dict(s)
        stages.append([str(name), "cached" if s.get("cached") else "computed", num(s.get("items_computed")),
                       num(s.get("items_cached")), "loaded" if s.get("model_loaded") else "–", num(s.get("seconds"))])
    skipped = [f"{public(as_dict(s).get('source', s))}: {as_dict(s).get('error', '')}"
               for s in as_list(m.get("skipped_images"))]
    return RunSection(
        facts=[(k, num(v)) for k, v in facts if v not in (None, "")],
        models=Table(["role", "model", "identity", "revision"], models) if models else None, stages=stages,
        warnings=listing("Warnings", [str(w) for w in as_list(m.get("warnings"))]),
        skipped=listing("Skipped images", skipped),
        parameters=[(str(k), json.dumps(public_values(v), default=str, ensure_ascii=False))
                    for k, v in as_dict(m.get("parameters")).items()])


# post-sampling and fine-tuning ---------------------------------------------------------------------
@dataclass
class PostSamplingSection:
    facts: list[tuple[str, str]]
    pool_sheet: bool  # preview_pool.png exists


def post_sampling_section(f: Folder) -> PostSamplingSection | None:
    """Run-level values of a ``post_sampling`` manifest section (per-image scores go on the cards)."""
    m = f.manifest
    ps = as_dict(m.get("post_sampling"))
    if m.get("command") == "select":  # a folder `vlcp select` wrote: the selection is the whole run
        ps = {"method": m.get("method"), "pool": m.get("pool"), "candidates": len(as_list(m.get("candidates"))), **ps}
    scalars = {k: v for k, v in ps.items() if isinstance(v, (str, int, float, bool)) or v is None}
    sheet = (f.root / "preview_pool.png").is_file()
    if not scalars and not sheet:
        return None
    return PostSamplingSection([(str(k), num(public(v), 4)) for k, v in scalars.items()], sheet)


@dataclass
class FinetuneSection:
    facts: list[tuple[str, str]]
    plot: LossPlot | None  # drawn from the losses, else
    loss_png: bool  # finetune_loss.png is shown, else a note says the curve is missing
    steps: int
    source: str


def finetune_section(f: Folder) -> FinetuneSection | None:
    ft = as_dict(f.manifest.get("finetune"))
    png = (f.root / "finetune_loss.png").is_file()
    if not f.losses and not ft and not png:
        return None
    facts = [(str(k), num(public(v), 4)) for k, v in ft.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    return FinetuneSection(facts, loss_plot(f.losses) if f.losses else None, png, len(f.losses), f.loss_source)


# refinement ----------------------------------------------------------------------------------------
@dataclass
class RefinementSection:
    facts: list[tuple[str, str]]
    table: Table | None
    sheet: bool  # preview_refined.png exists


def refinement_section(f: Folder) -> RefinementSection | None:
    """The detector, the selection settings, per class counts and confidences, the before/after sheet."""
    r = as_dict(f.manifest.get("refinement"))
    if not r:
        return None
    det = as_dict(r.get("detector"))
    facts = [("detector", public(det.get("model"))), ("detector source", public(det.get("source"))),
             ("detector epochs", det.get("epochs")), ("detector test accuracy (%)", det.get("accuracy")),
             ("β (defective if p ≤ β)", r.get("beta")), ("candidates per defective image", r.get("candidates")),
             ("top-k", r.get("top_k")), ("images replaced", len(as_dict(r.get("replacements"))))]
    pool = "pool_replacements" in r  # after SAS post-sampling: the next-ranked pool candidate first
    if pool:
        facts.append(("replaced from the SAS pool first", sum(isinstance(d, dict) and d.get("candidate") is not None
                                                              for d in as_dict(r.get("pool_replacements")).values())))
    names = dict(f.classes)
    rows = []
    for folder, s in as_dict(r.get("per_class")).items():
        s = as_dict(s)
        first = [num(s.get("defective_before_pool")), num(s.get("pool_replaced"))] if pool else []
        rows.append([f"{folder} · {names.get(folder, folder)}", num(s.get("images")), *first,
                     num(s.get("defective")), num(s.get("valid")), num(s.get("fallback")),
                     f"{num(s.get('confidence_before'), 3)} → {num(s.get('confidence_after'), 3)}"])
    head = ["class", "images", *(["defective after SAS", "from the SAS pool"] if pool else []), "defective",
            "from a valid pool", "by fallback", "mean p(class) before → after"]
    return RefinementSection([(k, num(v)) for k, v in facts if v is not None],
                             Table(head, rows, "num") if rows else None, (f.root / "preview_refined.png").is_file())


# evaluation ----------------------------------------------------------------------------------------
@dataclass
class EvaluationRow:
    model: str
    protocol: str
    ipc: str
    epochs: str
    seeds: str
    final: str
    best: str
    best_label: str
    per_seed: str
    paper: str | None  # the paper's VLCP figure for the same setting
    paper_source: str
    file: str


@dataclass
class FusionItem:
    model: str
    protocol: str
    accuracy: str
    note: str
    label: str
    file: str


@dataclass
class PublishedTable:
    dataset: str
    ipc: str
    methods: list[str]
    rows: list[tuple[str, str, str | None, list[str]]]  # network, protocol, this folder's figure, per method
    sources: str


@dataclass
class EvaluationSection:
    dataset: str
    rows: list[EvaluationRow]
    fusion: list[FusionItem]
    published: PublishedTable | None


def evaluation_record(name: str, res: dict) -> dict:
    """One evaluation file's fields (missing keys show as –)."""
    p, acc = as_dict(res.get("protocol")), as_dict(res.get("accuracy"))
    counts = [v for v in as_dict(res.get("images_per_class")).values() if isinstance(v, int)]
    per_seed = " ".join(num(v) for v in as_list(acc.get("per_seed")))
    return {"file": name, "dataset": str(as_dict(res.get("dataset")).get("name", "")),
            "model": str(p.get("model", "?")), "protocol": str(p.get("name", "?")),
            "ipc": min(counts) if counts else None, "epochs": p.get("epochs"), "final": pm(acc),
            "best": pm(acc.get("best_during_training")),
            "best_label": str(res.get("best_label") or "best during training"), "per_seed": per_seed or "–",
            "seeds": len(as_list(res.get("seeds"))) or len(as_list(acc.get("per_seed")))}


def matching_published(f: Folder, dataset: str, ipc: Any, protocol: str | None = None,
                       model: str | None = None) -> list[dict]:
    """Published entries for this dataset and IPC (and protocol/model when given); Table 5 rows only for
    the folder's own --text-strategy."""
    strategy = as_dict(f.manifest.get("parameters")).get("text_strategy")
    return [e for e in f.published if e.get("dataset") == dataset and e.get("ipc") == ipc
            and (protocol is None or e.get("protocol") == protocol) and (model is None or e.get("model") == model)
            and e.get("text_strategy", strategy) == strategy]


def evaluation_section(f: Folder) -> EvaluationSection:
    """vlcp's evaluations of this folder next to the paper's numbers for the same setting."""
    dataset = dataset_name(f.manifest)
    ipc = as_dict(f.manifest.get("parameters")).get("ipc")
    rows, evals = [], [evaluation_record(n, r) for n, r in f.evaluations]
    soft = [as_dict(r.get("soft_labels")).get("name") for _, r in f.evaluations]  # `vlcp evaluate --soft-labels`
    subsets = [class_subset(r) for _, r in f.evaluations]
    for e, labels, sub in zip(evals, soft, subsets):
        paper = [] if labels or sub else [  # soft labels, a class subset: not the paper's setting, no comparison
            p for p in matching_published(f, e["dataset"] or dataset, e["ipc"], e["protocol"], e["model"])
            if p.get("method") == "VLCP"]
        how = f"{e['protocol']}, soft labels {public(labels)}" if labels else e["protocol"]
        rows.append(EvaluationRow(
            public(e["model"]), f"{how}, {sub}" if sub else how,
            num(e["ipc"]),
            num(e["epochs"]), num(e["seeds"]), e["final"], e["best"], e["best_label"], e["per_seed"],
            pm(paper[0]) if paper else None, str(paper[0].get("source", "")) if paper else "", e["file"]))
    ours = {(e["protocol"], e["model"]): e["final"] for e, labels, sub in zip(evals, soft, subsets)
            if not labels and not sub}
    return EvaluationSection(public(dataset), rows, fusion_items(f.evaluations),
                             published_table(f, dataset, ipc, ours))


def class_subset(result: dict) -> str | None:
    """"3 of 10 classes" when the evaluation tested a set of a class subset on those classes (its ``test_split``),
    else None: such an accuracy is not comparable with the paper's, measured over every class."""
    t = as_dict(result.get("test_split"))
    classes, of = t.get("classes"), t.get("dataset_classes")
    if isinstance(classes, list) and isinstance(of, int) and len(classes) < of:
        return f"{len(classes)} of {of} classes"
    return None


def fusion_items(evaluations: list[tuple[str, dict]]) -> list[FusionItem]:
    """The ``--caption-fusion`` results: a separate list under the table, never in the headline column."""
    items = []
    for name, res in evaluations:
        fu, p = as_dict(res.get("caption_fusion")), as_dict(res.get("protocol"))
        if fu:
            items.append(FusionItem(str(public(p.get("model", "?"))), str(p.get("name", "?")), pm(fu.get("accuracy")),
                                    str(fu.get("note", "")), str(fu.get("label", "")), name))
    return items


def published_table(f: Folder, dataset: str, ipc: Any, ours: dict[tuple[str, str], str]) -> PublishedTable | None:
    """The paper's table rows for this dataset and IPC: one row per (protocol, network), one column per method."""
    entries = matching_published(f, dataset, ipc)
    if not entries:
        return None
    methods: list[str] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for e in entries:
        m = str(e.get("method"))
        if m not in methods:
            methods.append(m)
        cells.setdefault((str(e.get("protocol")), str(e.get("model"))), {})[m] = pm(e)
    rows = [(model, proto, ours.get((proto, model)), [cells[(proto, model)].get(m, "–") for m in methods])
            for (proto, model) in cells]
    sources = "; ".join(sorted({str(e.get("source", "")) for e in entries}))
    return PublishedTable(public(dataset), num(ipc), methods, rows, sources)
