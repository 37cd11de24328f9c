"""Semantic-aware post-sampling (``--post-sample sas``): stages of the table between synthesis and refinement.

vlcp's formulation of SAS (arXiv 2605.18012) from its abstract (``vlcp/method/sas.py``), not the authors'
method. pool -> clip_image -> clip_text -> post_sampling: every synthetic image gets
``--pool-multiplier`` - 1 siblings from its prototype and prompt (seeds from the image's seed and the
candidate index, cached as refinement candidates are: the same (prototype, prompt, seed) is generated
once whoever asks), CLIP embeds the pool (cached per image content), and the selection keeps IPC per
class. A new ``--sas-*`` value recomputes only the selection: no image generated, no CLIP call.

vlcp's additions from the multi-modal paper's abstract (also vlcp's formulation): every candidate's
caption match M (CLIP cosine with the prompt it was generated from: the pool's image embeddings and the
prompts' text embeddings, no other CLIP call) is recorded and weighs ``--sas-caption-weight`` in the
stage-1 quality; with ``--min-foreground F`` the ``pool_foreground`` stage measures every pool image's
foreground (the ``foreground`` cache: an image is segmented once) and stage 1 drops candidates under F.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlcp.method import refine
from vlcp.pipeline.stage import Stage
from vlcp.pipeline.stages import masks as ms
from vlcp.pipeline.stages.synthesis import generate
from vlcp.store.arrays import Arrays
from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def pool(run: Run, step: Step) -> None:
    """Candidates 1..m-1 of every synthetic image (candidate 0 is the image itself)."""
    p, st = step.p, run.st
    m = p.pool_multiplier
    if m == 1:
        run.warn("--pool-multiplier 1: the pool is the synthetic set itself, so the selection keeps it as is")
    extra = [(i, k) for i in range(len(st.items)) for k in range(1, m)]
    lat = st.syn_latents.pick(i for i, _ in extra)
    texts = [st.texts[i] for i, _ in extra]
    seeds = [refine.candidate_seed(st.seeds[i], k) for i, k in extra]
    keys = [st.synth_key(z, t, s) for z, t, s in zip(lat.digests(), texts, seeds)]

    def compute(idx):
        for j, (meta, tensors) in zip(idx, generate(run, idx, lat, texts, seeds)):
            yield {**meta, "of": extra[j][0], "candidate": extra[j][1]}, tensors

    entries, _ = step.items(keys, compute, p.synthesis_batch_size, "synth", cache_stage="candidates", retain=False)
    run.need("clip_image", entries)
    st.pool = [(i, 0) for i in range(len(st.items))] + extra  # (synthetic image, candidate index)
    st.pool_images = st.images + Arrays.stored(entries, "image")
    st.pool_keys = list(st.syn_keys) + keys
    st.pool_seeds = list(st.seeds) + seeds


def clip_image(run: Run, step: Step) -> None:
    """CLIP embedding of every pool image, cached per (image content, CLIP) like `vlcp select`'s."""
    from vlcp.models import clip

    p, st, ref = step.p, run.st, run.refs.clip
    keys = [clip.image_key(h, ref.identity) for h in st.pool_images.digests()]

    def compute(idx):
        model, processor = run.models["clip"]()
        emb = clip.embed_images(model, processor, [st.pool_images[i] for i in idx], None, p.clip_batch_size)
        return (({}, {"embedding": e}) for e in emb)

    entries, _ = step.items(keys, compute, p.clip_batch_size, "clip", cache_stage=clip.IMAGE_STAGE)
    run.need("post_sampling", entries)
    st.clip_keys = keys
    st.pool_emb = np.stack([e.tensors["embedding"] for e in entries])


def pool_foreground(run: Run, step: Step) -> None:
    """Foreground fraction of every pool image (``--min-foreground`` drops candidates under it in stage 1)."""
    st = run.st
    st.pool_foreground, st.pool_fg_key = ms._foreground(run, step, st.pool_images, [st.items[i][0] for i, _ in st.pool])


def clip_text(run: Run, step: Step) -> None:
    """The relevance anchors (class prompts by default, each prototype's prompt, or real-image centroids) and
    the embedding of every prototype's prompt, against which its candidates' caption match is measured."""
    from vlcp.models import clip
    from vlcp.pipeline.stages.caption_match import merged_report

    p, st, ref = step.p, run.st, run.refs.clip
    classes = [] if p.sas_anchor == "centroid" else clip.class_prompts([c.name for c in run.ds.classes],
                                                                        p.clip_prompt)
    uniq = sorted(set(classes) | set(st.texts))  # one item per distinct text
    keys = [clip.text_key(t, ref.identity) for t in uniq]

    def compute(idx):
        model, processor = run.models["clip"]()
        return (({}, {"embedding": e}) for e in clip.embed_texts(model, processor, [uniq[i] for i in idx]))

    entries, rep = step.items(keys, compute, 64, "clip", cache_stage=clip.TEXT_STAGE)
    run.need("post_sampling", entries)
    by_text = {t: (e.tensors["embedding"], k) for t, e, k in zip(uniq, entries, keys)}
    st.prompt_emb = np.stack([by_text[t][0] for t in st.texts])
    st.prompt_key = stable_hash([by_text[t][1] for t in st.texts])
    st.own_anchors = st.prompt_emb if p.sas_anchor == "prototype" else None
    if p.sas_anchor != "centroid":
        st.anchors = np.stack([by_text[t][0] for t in classes])
        st.anchor_key = stable_hash([by_text[t][1] for t in classes])
        return
    from vlcp.method.anchors import real_centroids
    from vlcp.method.sas import SasError
    from vlcp.pipeline.run import DistillError

    try:
        st.anchors, real, _ = real_centroids(run.cache, ref, run.ds, run.models["clip"], p.clip_batch_size,
                                             run.cfg.progress and "clip real")
    except SasError as exc:
        raise DistillError(str(exc)) from None
    st.anchor_key = stable_hash([ref.identity, [s.digest for s in run.ds.samples]])
    run.reports[-1] = merged_report(step.stage.name, stable_hash([keys, st.anchor_key]), [rep, real])


def post_sampling(run: Run, step: Step) -> None:
    """The selection (vlcp's formulation of SAS): IPC images per class from the pool."""
    from vlcp.method import sas
    from vlcp.pipeline.stages.caption_match import cosines

    p, st = step.p, run.st
    labels = np.array([st.items[i][0] for i, _ in st.pool], np.int64)
    protos = np.array([i for i, _ in st.pool], np.int64)  # the synthetic image (= prototype) it comes from
    own = st.own_anchors[protos] if st.own_anchors is not None else None
    st.pool_match = cosines(st.pool_emb, st.prompt_emb[protos])  # M: each candidate against its own prompt
    fg = np.asarray(st.pool_foreground, np.float64) if p.min_foreground else None  # F = 0 drops nothing
    params = sas.SasParams(p.ipc, p.sas_keep, p.sas_alpha, p.sas_lambda, p.select, p.sas_per_prototype, True,
                           p.seed, p.sas_caption_weight, p.min_foreground or None)
    key = step.key(embeddings=stable_hash(st.clip_keys), anchors=st.anchor_key, prompts=st.prompt_key,
                   **({"foreground": st.pool_fg_key} if p.min_foreground else {}))

    def compute():
        sel = sas.select(st.pool_emb, labels, st.anchors, params, own, protos, st.pool_match, fg)
        return {"picked": {str(c): v for c, v in sel.picked.items()}, "candidates": sel.records()}, {}

    entry, _ = step.whole(key, compute)
    picked = {int(c): v for c, v in entry.meta["picked"].items()}
    st.pool_records = entry.meta["candidates"]
    _adopt(run, picked)
    run.manifest["post_sampling"] = {"method": sas.LABEL, "pool_multiplier": len(st.pool) // max(1, len(st.items)),
                                     "params": {"keep": p.sas_keep, "alpha": p.sas_alpha, "lambda": p.sas_lambda,
                                                "select": p.select, "per_prototype": p.sas_per_prototype,
                                                "anchor": p.sas_anchor, "caption_weight": p.sas_caption_weight,
                                                "min_foreground": p.min_foreground},
                                     **_records(run, entry.meta["candidates"], picked)}


def _adopt(run: Run, picked: dict[int, list[int]]) -> None:
    """The picks become the synthetic set: slot (c, j) takes class c's j-th pick, with its prototype, prompt,
    seed and key, so refinement regenerates from the prototype the kept image came from."""
    st = run.st
    order = [k for c in range(len(run.folders)) for k in picked.get(c, [])]
    src = [st.pool[k][0] for k in order]
    st.items = [(c, j) for c in range(len(run.folders)) for j in range(len(picked.get(c, [])))]
    st.slot_pool = order  # per kept image: its pool index (pool_replacements walks on from it)
    st.syn_latents = st.syn_latents.pick(src)
    st.texts = [st.texts[i] for i in src]
    st.seeds = [st.pool_seeds[k] for k in order]
    st.syn_keys = [st.pool_keys[k] for k in order]
    st.images = st.pool_images.pick(order)


def _records(run: Run, records: list[dict], picked: dict[int, list[int]]) -> dict:
    """``images``: per kept image (``<class>/<index>.png``) its scores; ``pool``: every candidate's record."""
    out = {}
    for c, ks in picked.items():
        for j, k in enumerate(ks):
            out[f"{run.folders[c]}/{j:04d}.png"] = image_record(run, records[k], k)
    return {"images": out, "pool": records}


def image_record(run: Run, r: dict, k: int) -> dict:
    """What the manifest says of the image at an output path: pool candidate k's scores (record r)."""
    pool = run.st.pool
    return {"prototype": pool[k][0], "candidate": pool[k][1], "relevance": r["relevance"], "margin": r["margin"],
            **{n: r[n] for n in ("caption_match", "foreground") if n in r}, "quality": r["quality"],
            "diversity_at_pick": r["diversity_at_pick"], "rank": r["rank"], "why": r["why"]}


STAGES = [
    Stage("pool", pool, 1, "`--pool-multiplier` - 1 more images per prototype (seeds from the image's seed "
          "and the candidate index), shared with refinement candidates", "image", selects=("pool_multiplier",),
          unkeyed=("synthesis_batch_size",), inputs="the synthesis key of each candidate", models=("pipe", "synth"),
          enabled_by="sas", stored_as=("candidates",)),
    Stage("clip_image", clip_image, 1, "CLIP embedding of every pool image", "image", unkeyed=("clip_batch_size",),
          inputs="image content hash, CLIP id@commit", models=("clip",), enabled_by="sas"),
    ms._foreground_stage("pool_foreground", pool_foreground, "foreground fraction of every pool image; post-"
                         "sampling's stage 1 drops those under `--min-foreground` (vlcp's formulation)",
                         enabled_by="sas_foreground"),
    Stage("clip_text", clip_text, 2, "relevance anchors (class prompts, prototype prompts or real centroids) "
          "and every prototype's prompt (the caption match of its candidates)", "image", selects=("sas_anchor", "clip_prompt"), unkeyed=("clip_batch_size",),
          inputs="text, CLIP id@commit", models=("clip",), enabled_by="sas"),
    Stage("post_sampling", post_sampling, 2, "vlcp's formulation of SAS from its abstract: stage-1 filter by "
          "foreground (`--min-foreground`), margin and a quality of relevance, margin and caption match "
          "(`--sas-caption-weight`), stage-2 greedy quality vs diversity", params=(
              "ipc", "sas_keep", "sas_alpha", "sas_lambda", "select", "sas_per_prototype", "sas_anchor", "seed",
              "sas_caption_weight", "min_foreground"),
          inputs="embedding keys, anchor keys, prompt keys (and pool foreground keys with `--min-foreground`)",
          enabled_by="sas"),
]

