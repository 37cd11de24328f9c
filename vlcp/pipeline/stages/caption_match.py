"""Caption matching on synthetic images: vlcp's reading of the multi-modal paper's abstract (arXiv 2505.08605).

The abstract names a caption-matching loss that aligns real and synthetic data semantically; vlcp
generates in one shot, so vlcp's reading (not the authors' method) scores instead of optimising: the
CLIP cosine between each synthetic image (and refinement candidate) and the prompt it was generated
from (its cluster's text prototype), with the class prompt's cosine reported beside it. With
``--min-caption-match S`` (and ``--refine``) an image under S is defective and a candidate under S is
not valid. Embeddings share the post-sampling CLIP caches (``vlcp/models/clip.py``: per image content and per
text, keyed by the CLIP identity), so changing S recomputes no embedding. The same cosine of every pool
candidate is a post-sampling score (``vlcp/pipeline/stages/post_sampling.py``, ``--sas-caption-weight``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vlcp.models.segment import LABEL
from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step
    from vlcp.pipeline.stage import Stage
    from vlcp.store.runner import StageReport


def cosines(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit vectors: image i against text i."""
    return np.einsum("nd,nd->n", np.asarray(images, np.float64), np.asarray(texts, np.float64))


def _embed(run: Run, step: Step, images: Sequence[np.ndarray], texts: list[str]
           ) -> tuple[np.ndarray, np.ndarray, str]:
    """(image embeddings, text embeddings, a hash of their keys), from the shared CLIP caches; one report."""
    from vlcp.models import clip
    from vlcp.store.arrays import digests

    p, ref = step.p, run.refs.clip
    img_keys = [clip.image_key(h, ref.identity) for h in digests(images)]
    uniq = sorted(set(texts))
    txt_keys = [clip.text_key(t, ref.identity) for t in uniq]

    def embed_images(idx):
        model, processor = run.models["clip"]()
        emb = clip.embed_images(model, processor, [images[i] for i in idx], None, p.clip_batch_size)
        return (({}, {"embedding": e}) for e in emb)

    def embed_texts(idx):
        model, processor = run.models["clip"]()
        return (({}, {"embedding": e}) for e in clip.embed_texts(model, processor, [uniq[i] for i in idx]))

    t_entries, t_rep = step.items(txt_keys, embed_texts, 64, "clip", cache_stage=clip.TEXT_STAGE)
    i_entries, i_rep = step.items(img_keys, embed_images, p.clip_batch_size, "clip", cache_stage=clip.IMAGE_STAGE)
    run.reports[-2:] = [merged_report(step.stage.name, stable_hash([txt_keys, img_keys]), [t_rep, i_rep])]
    run.need(step.stage.name, t_entries + i_entries)
    by_text = dict(zip(uniq, (e.tensors["embedding"] for e in t_entries)))
    dim = len(next(iter(by_text.values()))) if by_text else 0
    img = np.stack([e.tensors["embedding"] for e in i_entries]) if i_entries else np.zeros((0, dim), np.float32)
    txt = np.stack([by_text[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)
    return img, txt, stable_hash([txt_keys, img_keys])


def merged_report(name: str, key: str, reports: list) -> StageReport:
    """One stage report for a stage that read two caches (texts and images): the manifest has one per stage."""
    from vlcp.store.runner import StageReport

    return StageReport(name, key, all(r.cached for r in reports), sum(r.items_computed for r in reports),
                       sum(r.items_cached for r in reports), any(r.model_loaded for r in reports),
                       round(sum(r.seconds for r in reports), 3))


def _class_texts(run: Run, step: Step, classes: list[int]) -> list[str]:
    from vlcp.models import clip

    return clip.class_prompts([run.ds.classes[c].name for c in classes], step.p.clip_prompt)


def caption_match(run: Run, step: Step) -> None:
    """CLIP cosine of every synthetic image with its prompt (the criterion) and its class prompt (reported)."""
    st = run.st
    classes = [c for c, _ in st.items]
    n = len(st.images)
    img, txt, st.match_key = _embed(run, step, st.images + st.images, list(st.texts) + _class_texts(run, step, classes))
    both = cosines(img, txt)
    st.caption_match, st.class_match = [float(v) for v in both[:n]], [float(v) for v in both[n:]]
    st.class_text_emb = txt[n:]  # per image: what a pool replacement's class match is measured against


def candidate_caption_match(run: Run, step: Step) -> None:
    """CLIP cosine of every refinement candidate with the prompt it was generated from."""
    st = run.st
    img, txt, st.cand_match_key = _embed(run, step, st.cand_images, [st.texts[i] for i, _ in st.cand])
    st.cand_caption_match = [float(v) for v in cosines(img, txt)]


def record(run: Run, threshold: float) -> None:
    """The manifest's caption match: per class the mean prompt and class-prompt cosines, and how many were under S."""
    st = run.st
    per_class = {}
    for c, f in enumerate(run.folders):
        rows = [i for i, (k, _) in enumerate(st.items) if k == c]
        per_class[f] = {"mean_prompt_match": _mean([st.caption_match[i] for i in rows]),
                        "mean_class_match": _mean([st.class_match[i] for i in rows]),
                        "below": sum(st.caption_match[i] < threshold for i in rows)}
    run.manifest["caption_match"] = {"method": LABEL, "min_caption_match": threshold,
                                     "clip": run.refs.clip.identity, "per_class": per_class}


def _mean(v: list[float]) -> float | None:
    return round(float(np.mean(v)), 4) if v else None


def image_stages() -> list[Stage]:
    """After foreground (a function, so this module imports without the stage table: no import cycle)."""
    from vlcp.pipeline.stage import Stage

    return [Stage("caption_match", caption_match, 1, "CLIP cosine of every synthetic image with its prompt (and "
                  "its class prompt); under `--min-caption-match` it is defective (vlcp's reading of the "
                  "multi-modal paper)", "image", selects=("clip_prompt",), unkeyed=("clip_batch_size",),
                  inputs="image content hash, text, CLIP id@commit (the post-sampling CLIP caches)",
                  models=("clip",), enabled_by="min_caption_match", stored_as=("clip_image", "clip_text"))]


def candidate_stages() -> list[Stage]:
    """After candidate_foreground."""
    from vlcp.pipeline.stage import Stage

    return [Stage("candidate_caption_match", candidate_caption_match, 1, "CLIP cosine of every refinement "
                  "candidate with its prompt; under `--min-caption-match` it is not valid", "image",
                  unkeyed=("clip_batch_size",), inputs="image content hash, text, CLIP id@commit",
                  models=("clip",), enabled_by="min_caption_match", stored_as=("clip_image", "clip_text"))]
