"""The stages of detector-guided refinement (``--refine``), entries of the stage table after synthesis.

detector -> detector_scores -> candidates -> candidate_scores -> refinement. Scores are cached per
(detector, image content); candidates share the synthesis keys, so the same (prototype, prompt,
seed) is generated once whoever asks; the selection is cached from its inputs' keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlcp import refine
from vlcp.runner import Lazy
from vlcp.stages import Stage, generate

if TYPE_CHECKING:
    from vlcp.distill import Run, Step


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
    from vlcp.datasets import load_dataset
    from vlcp.distill import Run, Step

    cfg.fill_defaults()
    run = Run(cfg, cache, load_dataset(cfg.data, cfg.data_dir, "train", cfg.classes), None, 0, False, {})
    detector(run, Step(run, STAGES[0]))
    return run.st.detector, run.models["detector"](), run.ds


def _device(run: Run) -> str:
    from vlcp import models

    return models.torch_device(run.cfg.device)


def score(run: Run, step: Step, images: list[np.ndarray]) -> list[dict]:
    """Detector verdicts per image (label, probabilities, penultimate features), cached per image content."""
    from vlcp.distill import array_hash

    det = run.st.detector
    keys = [step.key(detector=det.key, image=array_hash(im)) for im in images]

    def compute(idx):
        res = refine.scores_of(run.models["detector"](), [images[i] for i in idx], det.protocol, det.device())
        return (({"pred": r["pred"], "probs": r["probs"]}, {"feature": r["feature"]}) for r in res)

    entries, _ = step.items(keys, compute, 64, "detector", cache_stage="detector_scores")
    run.need(step.stage.name, entries)
    return [{"pred": e.meta["pred"], "probs": e.meta["probs"], "feature": e.tensors["feature"]} for e in entries]


def detector_scores(run: Run, step: Step) -> None:
    run.st.scores = score(run, step, run.st.images)


def candidates(run: Run, step: Step) -> None:
    """For each defective image, --refine-candidates new images from its prototype and prompt; with
    --min-foreground (--min-caption-match), an image whose foreground fraction (CLIP cosine with its prompt)
    is under it is defective too."""
    from vlcp import mask_stages as ms

    p, st = step.p, run.st
    targets = [c for c, _ in st.items]
    lacking = ms.below(st.foreground, p.min_foreground) | ms.below(st.caption_match, p.min_caption_match)
    st.defective = [i for i in range(len(st.items)) if i in lacking or refine.is_defective(
        st.scores[i]["pred"], st.scores[i]["probs"][targets[i]], targets[i], p.refine_beta)]
    st.cand = [(i, j) for i in st.defective for j in range(p.refine_candidates)]
    lat = [st.syn_latents[i] for i, _ in st.cand]
    texts = [st.texts[i] for i, _ in st.cand]
    seeds = [refine.candidate_seed(st.seeds[i], j) for i, j in st.cand]
    st.cand_keys = [st.synth_key(z, t, s) for z, t, s in zip(lat, texts, seeds)]

    def compute(idx):
        for k, (meta, tensors) in zip(idx, generate(run, idx, lat, texts, seeds)):
            yield {**meta, "of": st.cand[k][0], "candidate": st.cand[k][1]}, tensors

    st.n_candidates = p.refine_candidates
    entries, _ = step.items(st.cand_keys, compute, p.synthesis_batch_size, "synth")
    run.need("candidate_scores", entries)
    st.cand_images = [e.tensors["image"] for e in entries]


def candidate_scores(run: Run, step: Step) -> None:
    run.st.cand_scores = score(run, step, run.st.cand_images)


def refinement(run: Run, step: Step) -> None:
    """The selection (Eq. 5-6) from cached scores: which candidate replaces which defective image. With
    --min-foreground / --min-caption-match, images and candidates under them count as misclassified
    (defective / not valid)."""
    from vlcp import mask_stages as ms

    p, st = step.p, run.st
    folders = run.folders
    by_image: dict[int, list] = {}
    weak = ms.below(st.cand_foreground, p.min_foreground) | ms.below(st.cand_caption_match, p.min_caption_match)
    for (i, _), sc in zip(st.cand, ms.as_judged(st.cand_scores, weak)):
        by_image.setdefault(i, []).append(sc)
    scores = ms.as_judged(st.scores, ms.below(st.foreground, p.min_foreground) |
                          ms.below(st.caption_match, p.min_caption_match))
    extra = {"foreground": [st.fg_key, st.cand_fg_key]} if p.min_foreground else {}  # F = 0 judges nothing
    if p.min_caption_match:
        extra["caption_match"] = [st.match_key, st.cand_match_key]
    key = step.key(detector=st.detector.key, images=st.syn_keys, candidates=st.cand_keys, **extra)
    entry, _ = step.whole(key, lambda: (refine.select(folders, [c for c, _ in st.items], scores, by_image,
                                                      p.refine_beta, p.refine_top_k), {}))
    if p.min_foreground:
        ms.record_foreground(run, p.min_foreground)
    if p.min_caption_match:
        from vlcp import caption_match

        caption_match.record(run, p.min_caption_match)
    summary = {**entry.meta, "replacements": {int(i): d for i, d in entry.meta["replacements"].items()}}
    first = {i: k for k, (i, j) in enumerate(st.cand) if j == 0}
    images = list(st.images)
    for i, d in summary["replacements"].items():
        st.replaced[i] = images[i]
        images[i] = st.cand_images[first[i] + d["candidate"]]
        d["class"], d["cluster"] = folders[st.items[i][0]], st.items[i][1]
    st.images = images
    summary.update(beta=p.refine_beta, top_k=p.refine_top_k, candidates=st.n_candidates,
                   detector=st.detector.entry.meta)
    run.manifest["refinement"] = summary
    for f in folders:
        run.files["prototypes.json"]["classes"][f]["refinement"] = summary["per_class"][f]


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
          "`--min-caption-match`)", "image",
          selects=("refine_beta", "refine_candidates", "min_foreground", "min_caption_match"),
          unkeyed=("synthesis_batch_size",),
          inputs="the synthesis key of each candidate (its own seed)", models=("pipe", "synth"),
          enabled_by="refine"),
    Stage("candidate_scores", candidate_scores, refine.SCORES_VERSION, "the detector's verdict on every "
          "candidate", "image", inputs="detector key, image content hash", models=("detector",),
          enabled_by="refine"),
    Stage("refinement", refinement, refine.VERSION, "the selection: valid pool, top-k, least similar to the "
          "accepted images", params=("refine_beta", "refine_top_k", "min_foreground", "min_caption_match"),
          inputs="detector key, synthesis keys, candidate keys (and foreground / caption-match keys with "
          "`--min-foreground` / `--min-caption-match`)",
          enabled_by="refine"),
]
