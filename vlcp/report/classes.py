"""The data of the report's class grid: per class its synthetic images as cards, each with its cluster's
text prototype (caption split into marked and plain words), refinement verdict and post-sampling scores. A
source image's local absolute path shows as ``…/<file>`` (``card.public``)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vlcp.report.card import public
from vlcp.report.folder import Folder, as_dict, as_list, image_src
from vlcp.report.sections import num

SCORE_IDS = {"class", "folder", "cluster", "index", "file", "output", "prototype"}  # not scores
WORD = re.compile(r"[A-Za-z]+")


@dataclass
class Prototype:
    """A cluster's text prototype (Algorithm 2)."""
    caption: list[tuple[str, str]]  # (text, "rw" | "nw" | "" for unmarked); empty: no caption
    chips: list[tuple[str, str]]  # R_w as (word, frequency), most frequent first
    non_representative: str  # N, comma-separated
    meta: str  # score and source member, or ""
    prompt: str | None  # the prompt, when it is not the caption


@dataclass
class Card:
    """One synthetic image."""
    src: str  # relative, URL-quoted
    width: int  # 0 when unknown
    height: int
    alt: str
    file: str
    cluster_size: str | None
    verdict: tuple[str, str] | None  # ("replaced" | "kept", text)
    scores: list[tuple[str, str]]
    prototype: Prototype | None


@dataclass
class ClassBlock:
    index: int
    folder: str
    name: str | None  # None when it is the folder's name
    stats: str
    cards: list[Card]


@dataclass
class ClassesSection:
    classes: list[ClassBlock]


def highlight(caption: str, representative: dict, non_representative: list) -> list[tuple[str, str]]:
    """The caption as segments with R_w words marked "rw" and N words "nw" (matched as Algorithm 2 reads
    words: lower-cased runs of letters); the text between them has an empty mark."""
    rep = {str(w).lower() for w in representative}
    non = {str(w).lower() for w in non_representative}
    out, last = [], 0
    for m in WORD.finditer(caption):
        w = m.group(0).lower()
        cls = "rw" if w in rep else "nw" if w in non else ""
        if cls:
            out += [(caption[last:m.start()], ""), (m.group(0), cls)]
            last = m.end()
    return out + [(caption[last:], "")]


def _freq(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def prototype(rec: dict) -> Prototype:
    """A cluster's text prototype: caption with highlights, R_w, N, score, the prompt if it differs."""
    caption = str(rec.get("caption") or "")
    rep, non = as_dict(rec.get("representative_words")), as_list(rec.get("non_representative"))
    rw = sorted(((str(w), c) for w, c in rep.items()), key=lambda t: (-_freq(t[1]), t[0]))
    meta = []
    if "score" in rec:
        meta.append(f"score {num(rec.get('score'))}" + (_fallback(rec) if rec.get("fallback") else ""))
    if rec.get("member"):
        meta.append(f"from {public(rec['member'])}")
    prompt = rec.get("prompt")
    return Prototype(highlight(caption, rep, non) if caption else [], [(w, num(c)) for w, c in rw],
                     ", ".join(str(w) for w in non), " · ".join(meta),
                     prompt if isinstance(prompt, str) and prompt != caption else None)


def verdict(rep: dict | None, refined: bool, from_pool: dict | None = None) -> tuple[str, str] | None:
    """Refinement verdict of one image: kept, replaced by the next-ranked SAS pool candidate of its
    prototype, or replaced by a generated candidate (how, pool, p before → after)."""
    if rep is None and from_pool is not None and from_pool.get("candidate") is not None:
        return "replaced", (f"refinement: replaced by SAS pool candidate {num(from_pool.get('candidate'))} (rank "
                            f"{num(from_pool.get('rank'))} of its class, the next-ranked of its prototype)")
    if rep is None:
        return ("kept", "refinement: kept") if refined else None
    pool = len(as_list(rep.get("pool")))
    how = (f"from a valid pool of {pool}" if rep.get("how") == "valid" else
           "as fallback: no candidate was valid" if rep.get("how") == "fallback" else str(rep.get("how", "")))
    return "replaced", (f"refinement: replaced by candidate {num(rep.get('candidate'))} ({how}); p(class) "
                        f"{num(rep.get('p_before'), 3)} → {num(rep.get('p_after'), 3)}")


def score_items(scores: dict | None) -> list[tuple[str, str]]:
    """Post-sampling scores of one image, whatever their names."""
    return [(str(k), num(public(v), 3)) for k, v in (scores or {}).items()
            if isinstance(v, (str, int, float, bool)) or v is None]


def post_sampling_lookup(f: Folder) -> Callable[[str, str, int, int], dict | None]:
    """Per-image post-sampling scores by "folder/file", "folder/index", the global index, or records
    naming class and cluster/index; the section's container may be ``images``, ``per_image`` or ``scores``."""
    ps = as_dict(f.manifest.get("post_sampling"))
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

    for rec in as_list(f.manifest.get("candidates")):  # vlcp select: every pool image, "output" names its copies
        if isinstance(rec, dict):
            for out in as_list(rec.get("output")):
                by_key.setdefault(str(out), rec)

    def lookup(folder: str, file: str, j: int, i: int) -> dict | None:
        for k in (f"{folder}/{file}", f"{folder}/{j}", str(i)):
            if k in by_key:
                return {a: b for a, b in by_key[k].items() if a not in SCORE_IDS}
        return None

    return lookup


def classes_section(f: Folder) -> ClassesSection:
    """Per class its images with their prototypes and verdicts (the template adds the legend and navigation)."""
    protos = as_dict(f.prototypes.get("classes"))
    refinement = as_dict(f.manifest.get("refinement"))
    replacements = {(str(r.get("class")), r.get("cluster")): r
                    for r in as_dict(refinement.get("replacements")).values() if isinstance(r, dict)}
    from_pool = {(str(r.get("class")), r.get("cluster")): r
                 for r in as_dict(refinement.get("pool_replacements")).values() if isinstance(r, dict)}
    scores = post_sampling_lookup(f)
    blocks, i = [], 0
    for c, (folder, name) in enumerate(f.classes):
        clusters = as_list(as_dict(protos.get(folder)).get("clusters"))
        cards = []
        for pos, (file, w, h) in enumerate(f.images.get(folder, [])):
            stem = Path(file).stem
            j = int(stem) if stem.isdigit() else pos
            k = _cluster(f.metadata.get(f"{folder}/{file}"), j)  # after SAS image j need not be cluster j's
            rec = as_dict(clusters[k]) if 0 <= k < len(clusters) else {}
            v = verdict(replacements.get((folder, j)), bool(refinement), from_pool.get((folder, j)))
            cards.append(card(image_src(f, folder, file), name, file, (w, h), j, rec, v, scores(folder, file, j, i)))
            i += 1
        blocks.append(class_block(f, c, folder, name, cards))
    return ClassesSection(blocks)


def class_block(f: Folder, c: int, folder: str, name: str, cards: list[Card]) -> ClassBlock:
    stats = []
    used = as_dict(f.manifest.get("images_per_class")).get(folder)
    if used is not None:
        stats.append(f"{num(used)} real images")
    removed = as_dict(as_dict(f.manifest.get("outliers")).get(folder)).get("removed")
    if removed is not None:
        stats.append(f"{num(removed)} removed as outliers (LOF)")
    ref = as_dict(as_dict(as_dict(f.manifest.get("refinement")).get("per_class")).get(folder))
    if ref:
        stats.append(f"refinement: {num(ref.get('defective'))} defective, mean p(class) "
                     f"{num(ref.get('confidence_before'), 3)} → {num(ref.get('confidence_after'), 3)}")
    return ClassBlock(c, folder, None if name == folder else name, " · ".join(stats + [f"{len(cards)} synthetic"]),
                      cards)


def _cluster(row: dict | None, j: int) -> int:
    """The image's cluster: its metadata.jsonl row's, else (a set written before it) its index."""
    k = as_dict(row).get("cluster")
    return k if isinstance(k, int) and not isinstance(k, bool) else j


def card(src: str, name: str, file: str, size: tuple[int, int], j: int, rec: dict,
         verdict: tuple[str, str] | None, scores: dict | None) -> Card:
    """One synthetic image (``src``: its path relative to the page) with its cluster's size and text prototype."""
    w, h = size
    return Card(quote(src), w, h, f"{name}, image {j}", file,
                num(rec["cluster_size"]) if "cluster_size" in rec else None, verdict, score_items(scores),
                prototype(rec) if rec else None)


def _fallback(rec: dict) -> str:
    """What a cluster none of whose captions scored was given: the reference's empty prompt, or (the paper's
    reading) its closest member's caption."""
    return " (no caption scored: empty prompt, as the reference)" if rec.get("mode") == "reference" else \
        " (fallback: closest member)"
