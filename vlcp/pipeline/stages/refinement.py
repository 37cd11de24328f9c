"""The stages of detector-guided refinement (``--refine``), entries of the stage table after synthesis.

detector -> detector_scores -> [pool_replacements] -> candidates -> candidate_scores -> refinement.
Scores are cached per (detector, image content), one key whichever stage asks; candidates share the
synthesis keys, so the same (prototype, prompt, seed) is generated once whoever asks; the selection is
cached from its inputs' keys. After ``--post-sample sas`` (vlcp's composition of its SAS formulation
with refinement), ``pool_replacements`` first gives each defective kept image the next-ranked good pool
candidate of its prototype; only the images still defective get new candidates, none of which is a
pool image.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vlcp.method import refine
from vlcp.pipeline.stage import Stage
from vlcp.pipeline.stages.synthesis import generate
from vlcp.store.arrays import Arrays
from vlcp.store.cache import stable_hash
from vlcp.store.runner import Lazy

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def detector(run: Run, step: Step) -> None:
    """Train (or load) the classifier that judges synthetic images; cached by dataset and recipe."""
    from dataclasses import asdict

    p = step.p
    proto = refine.detector_protocol(run.cfg.data, p.detector_arch, p.detector_epochs, p.detector)
    key = step.key(dataset=run.ds.identity(), protocol=asdict(proto), weights=refine.weights_identity(p.detector))
    dev = Lazy(lambda: _device(run))
    spec = refine.DetectorSpec(run.cfg.data, run.cfg.data_dir, run.cfg.classes, p.detector, p.seed)
    entry, _ = step.whole(key, lambda: refine.train_detector(run.cache, run.ds, proto, spec, key, dev(),
                                                             run.cfg.progress))
    run.st.detector = refine.Detector(proto, key, entry, dev)
    run.models["detector"] = Lazy(lambda: run.st.detector.load(run.ds.classes))


def standalone_detector(cfg, cache):
    """The detector stage outside a distillation (``vlcp refine`` on a foreign folder): (Detector, net, dataset)."""
    from vlcp.data.datasets import load_dataset
    from vlcp.pipeline.run import Run, Step

    cfg.fill_defaults()
    run = Run(cfg, cache, load_dataset(cfg.data, cfg.data_dir, "train", cfg.classes), None, 0, False, {})
    detector(run, Step(run, STAGES[0]))
    return run.st.detector, run.models["detector"](), run.ds


def _device(run: Run) -> str:
    from vlcp.models import loading as models

    return models.torch_device(run.cfg.device)


def score(run: Run, step: Step, images: Sequence[np.ndarray]) -> list[dict]:
    """Detector verdicts per image (label, probabilities, penultimate features), cached per image content."""
    from vlcp.pipeline.stages.masks import shared_key
    from vlcp.store.arrays import digests

    det = run.st.detector
    keys = [shared_key("detector_scores", refine.SCORES_VERSION, detector=det.key, image=h) for h in digests(images)]

    def compute(idx):
        res = refine.scores_of(run.models["detector"](), [images[i] for i in idx], det.protocol, det.device())
        return (({"pred": r["pred"], "probs": r["probs"]}, {"feature": r["feature"]}) for r in res)

    entries, _ = step.items(keys, compute, 64, "detector", cache_stage="detector_scores")
    run.need(step.stage.name, entries)
    return [{"pred": e.meta["pred"], "probs": e.meta["probs"], "feature": e.tensors["feature"]} for e in entries]


def detector_scores(run: Run, step: Step) -> None:
    run.st.scores = score(run, step, run.st.images)


def lacking(p, foreground, caption_match) -> set[int]:
    """Indices under --min-foreground or --min-caption-match (none for a criterion that is unset)."""
    from vlcp.pipeline.stages import masks as ms

    return ms.below(foreground, p.min_foreground) | ms.below(caption_match, p.min_caption_match)


def defective(scores: list[dict], targets: list[int], beta: float, lacking: set[int]) -> list[int]:
    """Indices of defective images: p(target) <= beta or a wrong label (refine.is_defective), or in ``lacking``
    (foreground under --min-foreground, caption match under --min-caption-match)."""
    return [i for i, (sc, t) in enumerate(zip(scores, targets))
            if i in lacking or refine.is_defective(sc["pred"], sc["probs"][t], t, beta)]


def pool_replacements(run: Run, step: Step) -> None:
    """After post-sampling: each defective kept image takes the next-ranked unpicked pool candidate of its
    prototype that is not defective by the same rule (sas_pool.pool_walk; no candidate used twice), before any
    new candidate is generated. Every candidate the walk may reach is scored at once (one batch, cached
    per image content with the detector_scores key, so an image is scored once whichever stage asks)."""
    from vlcp.method import sas_pool

    p, st = step.p, run.st
    targets = [c for c, _ in st.items]
    bad_slots = defective(st.scores, targets, p.refine_beta, lacking(p, st.foreground, st.caption_match))
    ranks = sas_pool.PoolRanks.of_records(st.pool_records)
    reach = sorted({k for i in bad_slots for k in ranks.reachable(st.slot_pool[i])})
    scores = dict(zip(reach, score(run, step, st.pool_images.pick(reach))))
    low = lacking(p, st.pool_foreground if p.min_foreground else [], st.pool_match)
    bad = {reach[j] for j in defective([scores[k] for k in reach], [int(ranks.labels[k]) for k in reach],
                                       p.refine_beta, {j for j, k in enumerate(reach) if k in low})}
    walk = sas_pool.pool_walk(ranks, [st.slot_pool[i] for i in bad_slots], bad)
    st.pool_swaps = {}
    for i, (k, visited) in zip(bad_slots, walk):
        record = {"source": "pool", "was": st.slot_pool[i], "candidate": k, "visited": visited,
                  "rank": None if k is None else int(ranks.rank[k]),
                  "p_before": st.scores[i]["probs"][targets[i]],
                  "p_after": None if k is None else scores[k]["probs"][targets[i]]}
        st.pool_swaps[i] = record
        if k is not None:
            _swap(run, i, k, scores[k], p.min_foreground)
    st.pool_swap_key = stable_hash([st.detector.key, sorted(st.pool_swaps.items())])


def _swap(run: Run, i: int, k: int, sc: dict, min_foreground) -> None:
    """Kept image i becomes pool candidate k (same prototype, so the same latent and prompt): its image,
    seed, synthesis key, detector verdict, foreground and caption match."""
    from vlcp.pipeline.stages.caption_match import cosines

    st = run.st
    st.replaced.setdefault(i, st.images.refs[i])
    st.images.refs[i], st.seeds[i], st.syn_keys[i], st.scores[i] = (st.pool_images.refs[k], st.pool_seeds[k],
                                                                     st.pool_keys[k], sc)
    st.slot_pool[i] = k
    if min_foreground:
        st.foreground[i] = st.pool_foreground[k]
    if st.caption_match:  # --min-caption-match: the caption_match stage measured the kept images
        st.caption_match[i] = float(st.pool_match[k])
        st.class_match[i] = float(cosines(st.pool_emb[k][None], st.class_text_emb[i][None])[0])


def candidates(run: Run, step: Step) -> None:
    """For each defective image, --refine-candidates new images from its prototype and prompt; with
    --min-foreground (--min-caption-match), an image whose foreground fraction (CLIP cosine with its prompt)
    is under it is defective too. After post-sampling, a candidate index whose image is in the pool is
    skipped: the pool was judged already (pool_replacements), so every candidate is a new image."""
    p, st = step.p, run.st
    st.defective = defective(st.scores, [c for c, _ in st.items], p.refine_beta,
                             lacking(p, st.foreground, st.caption_match))
    pool = set(st.pool_keys)
    st.cand, st.cand_keys, seeds = [], [], []
    for i in st.defective:
        j = n = 0
        while n < p.refine_candidates:
            seed = refine.candidate_seed(st.seeds[i], j)
            key = st.synth_key(st.syn_latents.digest(i), st.texts[i], seed)
            if key not in pool:
                st.cand.append((i, j))
                st.cand_keys.append(key)
                seeds.append(seed)
                n += 1
            j += 1
    lat = st.syn_latents.pick(i for i, _ in st.cand)
    texts = [st.texts[i] for i, _ in st.cand]

    def compute(idx):
        for k, (meta, tensors) in zip(idx, generate(run, idx, lat, texts, seeds)):
            yield {**meta, "of": st.cand[k][0], "candidate": st.cand[k][1]}, tensors

    st.n_candidates = p.refine_candidates
    entries, _ = step.items(st.cand_keys, compute, p.synthesis_batch_size, "synth", retain=False)
    run.need("candidate_scores", entries)
    st.cand_images = Arrays.stored(entries, "image")


def candidate_scores(run: Run, step: Step) -> None:
    run.st.cand_scores = score(run, step, run.st.cand_images)


def refinement(run: Run, step: Step) -> None:
    """The selection (Eq. 5-6) from cached scores: which candidate replaces which defective image. With
    --min-foreground / --min-caption-match, images and candidates under them count as misclassified
    (defective / not valid)."""
    from vlcp.pipeline.stages import masks as ms

    p, st = step.p, run.st
    folders = run.folders
    by_image: dict[int, list] = {}
    weak = lacking(p, st.cand_foreground, st.cand_caption_match)
    for (i, _), sc in zip(st.cand, ms.as_judged(st.cand_scores, weak)):
        by_image.setdefault(i, []).append(sc)
    scores = ms.as_judged(st.scores, lacking(p, st.foreground, st.caption_match))
    extra = {"foreground": [st.fg_key, st.cand_fg_key]} if p.min_foreground else {}  # F = 0 judges nothing
    if p.min_caption_match:
        extra["caption_match"] = [st.match_key, st.cand_match_key]
    if getattr(st, "pool_swap_key", None):  # after post-sampling: the pool replacements made before
        extra["pool"] = st.pool_swap_key
    key = step.key(detector=st.detector.key, images=st.syn_keys, candidates=st.cand_keys, **extra)
    entry, _ = step.whole(key, lambda: (refine.select(folders, [c for c, _ in st.items], scores, by_image,
                                                      p.refine_beta, p.refine_top_k), {}))
    if p.min_foreground:
        ms.record_foreground(run, p.min_foreground)
    if p.min_caption_match:
        from vlcp.pipeline.stages import caption_match

        caption_match.record(run, p.min_caption_match)
    summary = {**entry.meta, "replacements": {int(i): d for i, d in entry.meta["replacements"].items()}}
    first: dict[int, int] = {}
    for k, (i, _) in enumerate(st.cand):
        first.setdefault(i, k)
    images = st.images[:]  # a new list of references: nothing read
    for i, d in summary["replacements"].items():
        st.replaced.setdefault(i, images.refs[i])
        images.refs[i] = st.cand_images.refs[first[i] + d["candidate"]]
        d["class"], d["cluster"], d["source"] = folders[st.items[i][0]], st.items[i][1], "generated"
    st.images = images
    summary.update(beta=p.refine_beta, top_k=p.refine_top_k, candidates=st.n_candidates,
                   detector=st.detector.entry.meta, generated_for=len(st.defective))
    if getattr(st, "pool_swaps", None) is not None:
        _record_pool(run, summary)
    run.manifest["refinement"] = summary
    for f in folders:
        run.files["prototypes.json"]["classes"][f]["refinement"] = summary["per_class"][f]


def _record_pool(run: Run, summary: dict) -> None:
    """The manifest's pool replacements, apart from the generated ones: per defective kept image, the pool
    candidate (index into post_sampling.pool) and its SAS rank, or null when its prototype's pool was used up."""
    from vlcp.pipeline.stages.post_sampling import image_record

    st = run.st
    pool = {}
    images = run.manifest["post_sampling"]["images"]
    for i, d in st.pool_swaps.items():
        (c, j), k = st.items[i], d["candidate"]
        pool[i] = {**d, "class": run.folders[c], "cluster": j}
        if k is not None:  # post_sampling.images describes the image now at that path
            images[f"{run.folders[c]}/{j:04d}.png"] = {
                **image_record(run, st.pool_records[k], k),
                "why": f"pool replacement (rank {d['rank']}) of the defective pick {d['was']}"}
    summary["pool_replacements"] = pool
    for c, f in enumerate(run.folders):
        mine = [d for i, d in st.pool_swaps.items() if st.items[i][0] == c]
        summary["per_class"][f].update(defective_before_pool=len(mine),
                                       pool_replaced=sum(d["candidate"] is not None for d in mine))


POOL_STAGES = [
    Stage("pool_replacements", pool_replacements, 1, "after post-sampling: a defective kept image takes the "
          "next-ranked unpicked pool candidate of its prototype that is not defective (detector, and "
          "`--min-foreground` / `--min-caption-match`), before any new candidate is generated", "image",
          selects=("refine_beta", "min_foreground", "min_caption_match"),
          inputs="detector key, image content hash (the `detector_scores` keys)", models=("detector",),
          enabled_by="sas_refine", stored_as=("detector_scores",)),
]

STAGES = [
    Stage("detector", detector, refine.DETECTOR_VERSION, "a classifier trained on the real training images "
          "(or `--detector` weights); its test accuracy goes in the manifest",
          params=("detector", "detector_arch", "detector_epochs", "seed"),
          inputs="dataset identity, training recipe, weights file hash", enabled_by="refine"),
    Stage("detector_scores", detector_scores, refine.SCORES_VERSION, "label, probabilities and features of "
          "every synthetic image", "image", inputs="detector key, image content hash", models=("detector",),
          enabled_by="refine"),
    Stage("candidates", candidates, 1, "`--refine-candidates` new images per defective image (p <= "
          "`--refine-beta`, wrong label, foreground under `--min-foreground` or caption match under "
          "`--min-caption-match`; after post-sampling: still defective after the pool, and no pool image)", "image",
          selects=("refine_beta", "refine_candidates", "min_foreground", "min_caption_match"),
          unkeyed=("synthesis_batch_size",),
          inputs="the synthesis key of each candidate (its own seed)", models=("pipe", "synth"),
          enabled_by="refine"),
    Stage("candidate_scores", candidate_scores, refine.SCORES_VERSION, "the detector's verdict on every "
          "candidate", "image", inputs="detector key, image content hash", models=("detector",),
          enabled_by="refine",
          stored_as=("detector_scores",)),
    Stage("refinement", refinement, refine.VERSION, "the selection: valid pool, top-k, least similar to the "
          "accepted images", params=("refine_beta", "refine_top_k", "min_foreground", "min_caption_match"),
          inputs="detector key, synthesis keys, candidate keys (and foreground / caption-match keys with "
          "`--min-foreground` / `--min-caption-match`, the pool replacements after post-sampling)",
          enabled_by="refine"),
]
