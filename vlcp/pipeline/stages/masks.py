"""Object masks in the generative pipeline: vlcp's reading of the multi-modal paper's abstract (arXiv 2505.08605).

Not the authors' method (only the abstract is public; ``shared/papers/multimodal_dd_full.md``):

- ``masks`` (``--object-masks``): a CLIPSeg soft mask of every real image, prompted with the class name
  or ``--mask-prompt``, at the latent resolution, cached per (image, prompt, segmenter, size).
- ``--object-masks``: LOF and K-Means see foreground-weighted latents ``m * z`` (background suppressed),
  so clusters group by object rather than by background; the img2img start point stays the mean of the
  cluster members' *unmasked* latents. A class whose masks are all empty falls back to unmasked latents.
- ``foreground`` / ``candidate_foreground`` (``--min-foreground F``, with ``--refine``): the foreground
  fraction of every synthetic image and refinement candidate, cached per (image content, prompt,
  segmenter); an image under F is defective, a candidate under F is not valid. Changing F rescores nothing.
  (F = 0 can find nothing under it, so the foreground stages are skipped.)
- ``pool_foreground`` (``--min-foreground F`` with ``--post-sample sas``, ``vlcp/pipeline/stages/post_sampling.py``): the same
  fraction for every pool image; post-sampling's stage 1 drops candidates under F. Every foreground
  stage keys an image the same way (``shared_key``), so an image is segmented once whichever asks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vlcp.models.segment import LABEL, prompt_for
from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step
    from vlcp.pipeline.stage import Stage

MASKS_VERSION = 1
FOREGROUND_VERSION = 1
EMPTY_BELOW = 0.5  # a mask is empty when no pixel reaches this probability
FOREGROUND_SIZE = 64  # side at which a synthetic image's foreground fraction is measured


def latent_side(run: Run) -> int:
    """Side of the VAE latents: resolution / the VAE's downsampling (8 for SD v1.5)."""
    from vlcp.models.loading import read_config

    vae = read_config(run.refs.diffusion, "vae/config.json")
    return run.resolution // 2 ** (len(vae["block_out_channels"]) - 1)


def _segmenter_view(img, resolution: int, crop: str) -> np.ndarray:
    """The image exactly as the VAE saw it (same resize / crop), as uint8 HWC: masks align with latents."""
    from vlcp.method.latents import preprocess

    a = preprocess(img.convert("RGB"), resolution, crop)
    return np.clip(np.rint((a.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def is_empty(mask: np.ndarray) -> bool:
    return float(np.max(mask, initial=0.0)) < EMPTY_BELOW


def weighted(latents: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Foreground-weighted latents: each latent channel times the soft mask (N, C, h, w) * (N, h, w)."""
    if latents.shape[0] != masks.shape[0] or latents.shape[2:] != masks.shape[1:]:
        raise ValueError(f"masks {masks.shape} do not fit latents {latents.shape}")
    return (latents * masks[:, None]).astype(np.float32)


# masks ------------------------------------------------------------------------------------------------
def masks(run: Run, step: Step) -> None:
    """A soft object mask of every real image at the latent resolution (vlcp's reading, see module doc)."""
    from vlcp.models import segment

    p, st = step.p, run.st
    names = [run.ds.classes[s.class_idx].name for s in st.samples]
    size, seg = latent_side(run), run.refs.segmenter.identity
    texts = [prompt_for(n, p.mask_prompt) for n in names]
    st.mask_keys = [step.key(image=s.digest, prompt=t, segmenter=seg, resolution=run.resolution, size=size)
                    for s, t in zip(st.samples, texts)]

    def compute(idx):
        model, processor = run.models["segmenter"]()
        views = [_segmenter_view(st.samples[i].load(), run.resolution, p.crop) for i in idx]
        got = segment.masks_for(model, processor, views, [texts[i] for i in idx], size, p.mask_batch_size)
        return (({"foreground": float(m.mean())}, {"mask": m}) for m in got)

    st.mask_entries, _ = step.items(st.mask_keys, compute, p.mask_batch_size, "segmenter",
                                    retain=False)  # 16 KiB each: read back one class at a time
    run.need("outliers", st.mask_entries)
    st.mask_fallback = set()
    classes = {}
    for c, f in enumerate(run.folders):
        rows = st.by_class[c]
        fg = [st.mask_entries[i].meta["foreground"] for i in rows]
        empty = all(is_empty(st.mask_entries[i].read()["mask"]) for i in rows)
        if empty:
            st.mask_fallback.add(c)
            run.warn(f"class {f}: the object mask is empty for every image (prompt {texts[rows[0]]!r}); its "
                     f"outliers and clusters use the unmasked latents")
        classes[f] = {"prompt": texts[rows[0]], "mean_foreground": round(float(np.mean(fg)), 4),
                      "fallback_unmasked": empty}
    run.manifest["object_masks"] = {"method": LABEL, "segmenter": seg, "latent_size": size, "classes": classes}


def key_part(run: Run, on: bool) -> dict:
    """What the outliers key adds with --object-masks: the mask keys per class."""
    if not on:
        return {}
    run.need("outliers", run.st.mask_entries)
    return {"masks": {f: stable_hash([run.st.mask_keys[i] for i in run.st.by_class[c]])
                      for c, f in enumerate(run.folders)}}


def features(run: Run, rows: list[int], c: int, on: bool) -> np.ndarray:
    """What LOF and K-Means see for class c: its latents, foreground-weighted with --object-masks
    (unless every mask of the class is empty)."""
    z = np.stack([run.st.lat_entries[i].read()["latent"] for i in rows])  # read, not kept: one class at a time
    if not on or c in run.st.mask_fallback:
        return z
    return weighted(z, np.stack([run.st.mask_entries[i].read()["mask"] for i in rows]))


def unmasked_centres(run: Run, members: list[list[int]]) -> np.ndarray:
    """The img2img start points: the mean unmasked latent of each cluster's members (a natural background)."""
    return np.stack([np.mean([run.st.lat_entries[i].read()["latent"] for i in m], axis=0)
                     for m in members]).astype(np.float32)


def record_clusters(run: Run) -> None:
    """The manifest's mean foreground fraction per cluster (class means are written by ``masks``)."""
    om = run.manifest.get("object_masks")
    if om is None:
        return
    for f, entry in run.st.clusters.items():
        om["classes"][f]["clusters"] = [round(float(np.mean([run.st.mask_entries[i].meta["foreground"]
                                                             for i in m])), 4) for m in entry.meta["members"]]


# foreground of synthetic images ---------------------------------------------------------------------
def shared_key(stage: str, version: int, **inputs) -> str:
    """A per-item key that several stages share (the key ``stage``'s own step would build; these stages key
    nothing by configuration value): the same image is computed once whichever stage asks."""
    from vlcp.store.cache import KEY_LAYOUT, stage_key

    return stage_key(stage, version, layout=KEY_LAYOUT, params={}, **inputs)


def _foreground(run: Run, step: Step, images: Sequence[np.ndarray], classes: list[int]) -> tuple[list[float], str]:
    """(foreground fraction per image, a hash of the keys), cached per (image content, prompt, segmenter)."""
    from vlcp.models import segment
    from vlcp.store.arrays import digests

    p = step.p
    seg = run.refs.segmenter.identity
    texts = [prompt_for(run.ds.classes[c].name, p.mask_prompt) for c in classes]
    keys = [shared_key("foreground", FOREGROUND_VERSION, image=h, prompt=t, segmenter=seg,
                       size=FOREGROUND_SIZE) for h, t in zip(digests(images), texts)]

    def compute(idx):
        model, processor = run.models["segmenter"]()
        got = segment.masks_for(model, processor, [images[i] for i in idx], [texts[i] for i in idx],
                                FOREGROUND_SIZE, p.mask_batch_size)
        return (({"foreground": float(f)}, {}) for f in segment.foreground_fraction(got))

    entries, _ = step.items(keys, compute, p.mask_batch_size, "segmenter", cache_stage="foreground")
    run.need(step.stage.name, entries)
    return [e.meta["foreground"] for e in entries], stable_hash(keys)


def foreground(run: Run, step: Step) -> None:
    st = run.st
    st.foreground, st.fg_key = _foreground(run, step, st.images, [c for c, _ in st.items])


def candidate_foreground(run: Run, step: Step) -> None:
    st = run.st
    st.cand_foreground, st.cand_fg_key = _foreground(run, step, st.cand_images, [st.items[i][0] for i, _ in st.cand])


def below(values: list[float], threshold: float | None) -> set[int]:
    """Indices whose foreground fraction is under --min-foreground (none when it is unset)."""
    return set() if threshold is None else {i for i, v in enumerate(values) if v < threshold}


def as_judged(scores: list[dict], lacking: set[int]) -> list[dict]:
    """Detector scores with the images that lack foreground marked wrong (pred -1): refinement treats them
    as defective images / invalid candidates without changing refine.select."""
    return [dict(s, pred=-1) if i in lacking else s for i, s in enumerate(scores)]


def record_foreground(run: Run, threshold: float) -> None:
    """The manifest's foreground check: per class the mean fraction, and which images were under it."""
    st = run.st
    per_class = {}
    for c, f in enumerate(run.folders):
        vals = [v for (k, _), v in zip(st.items, st.foreground) if k == c]
        per_class[f] = {"mean_foreground": round(float(np.mean(vals)), 4) if vals else None,
                        "below": sum(v < threshold for v in vals)}
    run.manifest["foreground_check"] = {"method": LABEL, "min_foreground": threshold,
                                        "segmenter": run.refs.segmenter.identity, "per_class": per_class}


def mask_stages() -> list[Stage]:
    """After latents (a function, so this module imports without the stage table: no import cycle)."""
    from vlcp.pipeline.stage import Stage

    return [
        Stage("masks", masks, MASKS_VERSION, "CLIPSeg soft object mask of every real image at the latent resolution, "
              "prompted with the class name or `--mask-prompt` (vlcp's reading of the multi-modal paper's abstract)",
              "image", ("crop",), selects=("mask_prompt",), unkeyed=("mask_batch_size",),
              inputs="image hash, prompt, segmenter id@commit, resolution, latent size", models=("segmenter",),
              enabled_by="object_masks"),
    ]


def _foreground_stage(name: str, run, what: str, enabled_by: str = "refine_foreground") -> Stage:
    from vlcp.pipeline.stage import Stage

    return Stage(name, run, FOREGROUND_VERSION, what, "image", selects=("mask_prompt",),
                 unkeyed=("mask_batch_size",), inputs="image content hash, prompt, segmenter id@commit",
                 models=("segmenter",), enabled_by=enabled_by,
                 stored_as=() if name == "foreground" else ("foreground",))


def foreground_stages() -> list[Stage]:
    """After detector_scores."""
    return [_foreground_stage("foreground", foreground, "foreground fraction (mean CLIPSeg mask) of every "
                              "synthetic image; under `--min-foreground` it is defective")]


def candidate_foreground_stages() -> list[Stage]:
    """After candidate_scores."""
    return [_foreground_stage("candidate_foreground", candidate_foreground, "foreground fraction of every "
                              "refinement candidate; under `--min-foreground` it is not valid")]
