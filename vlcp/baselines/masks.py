"""Object masks of real images for the masked matching losses (``vlcp baseline --masks SOURCE``).

The multi-modal distillation paper (arXiv 2505.08605) restricts feature alignment and gradient
matching to the object; its abstract does not say how the masks are made. vlcp's reading offers:

- ``threshold``: for low-resolution grey data on a flat background (digits, Fashion-MNIST, MNIST).
  The background level of an image is the median of its one-pixel border (grey = channel mean);
  foreground = pixels whose grey value differs from it by more than ``margin`` intensity levels.
  Works offline, no model.
- ``clipseg``: text-prompted soft masks in [0, 1] from the segmenter of the object-mask stage
  (``vlcp.models.segment``: CLIPSeg ``CIDAS/clipseg-rd64-refined``, the tiny random CLIPSeg with ``--tiny``),
  prompted with the class name or ``--mask-prompt``, at the real images' resolution (the matching
  size), cached per (image content, prompt, segmenter identity, size) in stage ``matching_masks``.

A masked image keeps its foreground and replaces the background by the image's own background
level (``x~ = m * x + (1 - m) * b``, b = border median; m is 0/1 for ``threshold``, soft for
``clipseg``): on a flat background this only removes background noise, and the masked image stays on
the data's intensity scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcp.models.segment import prompt_for

SOURCES = ["threshold", "clipseg"]
DEFAULT_MARGIN = 8
MASKS_STAGE, MASKS_VERSION = "matching_masks", 1
CLIPSEG_BATCH = 16  # images per segmenter call (cannot change a mask: not in the key)


class MaskError(ValueError):
    pass


def check_source(source: str | None) -> None:
    """Refuse an unknown mask source before any work is done."""
    if source is None or source in SOURCES:
        return
    raise MaskError(f"unknown mask source {source!r}; available: {', '.join(SOURCES)}")


def background_level(x: np.ndarray) -> np.ndarray:
    """Per-image background grey level: the median of the one-pixel border. x: uint8 (N, C, H, W)."""
    grey = x.astype(np.float32).mean(1)
    border = np.concatenate([grey[:, 0, :], grey[:, -1, :], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def threshold_mask(x: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Boolean foreground mask (N, H, W): |grey - background level| > margin."""
    grey = x.astype(np.float32).mean(1)
    return np.abs(grey - background_level(x)[:, None, None]) > margin


def apply_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 images m * x + (1 - m) * b, b = each image's background level, rounded. A boolean mask keeps
    the foreground exactly and sets the background to b; a soft mask (clipseg, in [0, 1]) blends."""
    if mask.dtype == bool:
        fill = np.rint(background_level(x)).astype(np.uint8)[:, None, None, None]
        return np.where(mask[:, None], x, fill).astype(np.uint8)
    m = mask.astype(np.float32)[:, None]
    fill = np.rint(background_level(x)).astype(np.float32)[:, None, None, None]
    return np.clip(np.rint(m * x.astype(np.float32) + (1 - m) * fill), 0, 255).astype(np.uint8)


def masked(x: np.ndarray, source: str | None, margin: float = DEFAULT_MARGIN,
           soft: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The images to match against, and a summary for the manifest (mean foreground fraction).
    ``soft``: the clipseg masks (``clipseg_masks``), required for that source."""
    check_source(source)
    if source is None:
        return x, {"source": None}
    if source == "clipseg":
        if soft is None or soft.shape != (x.shape[0], *x.shape[2:]):
            raise MaskError(f"--masks clipseg: expected {x.shape[0]} masks of {x.shape[2:]}")
        return apply_mask(x, soft), {"source": source, "foreground_fraction": round(float(soft.mean()), 4)}
    m = threshold_mask(x, margin)
    return apply_mask(x, m), {"source": source, "margin": margin, "foreground_fraction": round(float(m.mean()), 4)}


@dataclass
class Segmenter:
    """What ``--masks clipseg`` needs besides the images: the segmenter and the prompt of each class."""
    name: str | None = None  # --segmenter (hub id or directory); None: the default, or the tiny one with tiny
    tiny: bool = False
    prompt: str | None = None  # --mask-prompt; None: each image's class name

    def ref(self, cache):
        """The segmenter's ModelRef (no model loaded): a one-line ModelError naming `hf download` if missing."""
        from vlcp.models.segment import resolve_segmenter

        return resolve_segmenter(self.name, self.tiny, cache)

    def key_parts(self, cache, names: list[str]) -> dict:
        """Identity of the masks for the result's key: segmenter id@commit and the prompt of every class."""
        return {"segmenter": self.ref(cache).identity, "prompts": [prompt_for(n, self.prompt) for n in names]}


def clipseg_masks(x: np.ndarray, labels: np.ndarray, names: list[str], seg: Segmenter, cache, device: str,
                  progress: bool = False) -> tuple[np.ndarray, dict]:
    """Soft masks (N, H, W) in [0, 1] of uint8 images (N, C, H, W), at their own resolution, and a summary
    (items computed / cached). Cached per (image content, prompt, segmenter identity, size)."""
    from vlcp.models import segment
    from vlcp.models.clip import pixel_hash
    from vlcp.store.cache import stage_key
    from vlcp.store.runner import Lazy, run_items

    ref, size = seg.ref(cache), x.shape[2]
    texts = [prompt_for(names[int(c)], seg.prompt) for c in labels]
    keys = [stage_key(MASKS_STAGE, MASKS_VERSION, image=pixel_hash(im), prompt=t, segmenter=ref.identity, size=size)
            for im, t in zip(x, texts)]
    model = Lazy(lambda: segment.load_segmenter(ref, device))

    def compute(idx):
        m, proc = model()
        views = [x[i][0] if x.shape[1] == 1 else x[i].transpose(1, 2, 0) for i in idx]
        got = segment.masks_for(m, proc, views, [texts[i] for i in idx], size, CLIPSEG_BATCH)
        return (({}, {"mask": g}) for g in got)

    entries, rep = run_items(cache, MASKS_STAGE, keys, compute, CLIPSEG_BATCH, model, progress and "masks")
    masks = np.stack([e.tensors["mask"] for e in entries]) if entries else np.zeros((0, size, size), np.float32)
    info = {"segmenter": ref.identity, "method": segment.LABEL, "computed": rep.items_computed,
            "cached": rep.items_cached, "prompt": seg.prompt or "class name"}
    return masks.astype(np.float32), info
